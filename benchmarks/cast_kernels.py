"""Where a compiled cast's time goes: its scales kernel and its element kernel timed apart, beside a copy and a read.

    .venv/bin/python benchmarks/cast_kernels.py [--formats mxfp4 mxfp8_e4m3 ...] [--size 4096] [--json PATH]

A block- or channel-scaled format's compiled cast (``numcast.formats.fused``) runs two kernels: the scales of every
row, then the element cast reading the input and those scales and writing into a given output. Each is timed on its
own on a ``size`` × ``size`` float32 tensor (huge-page advised, as in ``benchmarks/formats.py``), with
``numcast.cast(x, fmt, out=y)`` (both kernels and the call's own work) and, as floors, ``y.copy_(x)`` (read and
write) and ``x.sum()`` (read only). Each figure is the best of ``--rounds`` × ``--repeat`` calls after a warm-up,
the rows timed in turn round by round (``formats.interleaved_ms``). The element kernel's result is checked equal to
the eager cast first. It reads numcast's private kernel functions (``fused._scales_kernel``, ``fused._kernel``), so
it can time an older checkout too (``PYTHONPATH=<checkout>/src``) to see what a change did to each kernel.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from formats import interleaved_ms  # noqa: E402  (the speed table's timing loop)

FORMATS = ["mxfp4", "mxfp8_e4m3", "mxint8", "int4_g128", "nvfp4", "mx6"]


def kernels_of(x: torch.Tensor, out: torch.Tensor, name: str) -> tuple[Callable, Callable]:
    """(scales kernel call, element kernel call writing into ``out``) of the compiled cast of ``x`` to ``name``."""
    from numcast.formats import fused
    from numcast.formats.layout import Layout
    from numcast.formats.registry import get_format

    fmt = get_format(name)
    if not fused.scales_apart(fmt):
        raise SystemExit(f"{name}: its compiled cast has no scales kernel of its own")
    key, layout = fused.kernel_key(x, fmt, "nearest_even"), Layout.of(x.shape, fmt.scaling)
    rows = fused._mark_dynamic(fused._rows_view(layout, x), layout)
    rows_out = fused._mark_dynamic(fused._rows_view(layout, out), layout)
    scales_kernel, element_kernel = fused._scales_kernel(key), fused._kernel(key, True)
    scales = tuple(fused._mark_rows_dynamic(t) for t in scales_kernel(rows))
    return (lambda: scales_kernel(rows)), (lambda: element_kernel(rows, rows_out, *scales))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", nargs="+", default=FORMATS)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--repeat", type=int, default=4)
    p.add_argument("--json", default="benchmarks/results/cast_kernels.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import numcast
    from numcast.io import write_atomic
    from numcast.libc import advise_huge_pages

    x = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0)) * 3
    y = torch.empty_like(x)
    for t in (x, y):
        advise_huge_pages(t)
        t.copy_(x)
    names, fns = ["copy (y.copy_(x))", "read (x.sum())"], [lambda: y.copy_(x), lambda: x.sum()]
    for name in args.formats:
        scales, element = kernels_of(x, y, name)
        element()
        if not torch.equal(y.view(torch.int32), numcast.cast(x, name, backend="eager").view(torch.int32)):
            raise SystemExit(f"{name}: the element kernel's output differs from the eager cast")
        names += [f"{name} scales kernel", f"{name} element kernel", f"{name} cast, out="]
        fns += [scales, element, lambda name=name: numcast.cast(x, name, out=y)]
    timed = interleaved_ms(fns, args.rounds, args.repeat)
    copy_ms = timed[0][0]
    rows = [{"name": n, "ms": b, "median_ms": m, "x_copy": b / copy_ms} for n, (b, m) in zip(names, timed, strict=True)]
    print(f"| {args.size}x{args.size} float32, {args.threads} threads, best of {args.rounds * args.repeat} | ms | "
          "median ms | x copy |\n|---|---|---|---|")  # fmt: skip
    for r in rows:
        print(f"| {r['name']} | {r['ms']:.2f} | {r['median_ms']:.2f} | {r['x_copy']:.2f} |")
    payload = {"size": [args.size, args.size], "threads": args.threads, "torch": torch.__version__,
               "numcast_src": str(Path(numcast.__file__).parent), "rows": rows}  # fmt: skip
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.json, lambda q: q.write_text(json.dumps(payload, indent=2) + "\n"))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
