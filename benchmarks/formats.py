"""Speed of ``numcast.cast`` on a 4096×4096 float32 tensor, as a multiple of a memory-bound copy.

    .venv/bin/python benchmarks/formats.py --markdown      # the README table: both malloc settings, all backends
    .venv/bin/python benchmarks/formats.py [--size 4096] [--threads 2] [--rounds 4] [--repeat 4]
        [--formats mxfp4 nvfp4] [--backends auto eager compiled] [--malloc both|inherit] [--json PATH]
    .venv/bin/python benchmarks/formats.py --render benchmarks/results/formats.json   # table of a saved run
    python3 benchmarks/formats.py --device cuda --size 16384 --json PATH   # on a GPU (scripts/device_check.sh)

Backend ``auto`` is the default path users get, ``numcast.cast(x, fmt)`` with no backend argument (compiled for a
tensor this large where a C++ compiler is present); ``eager`` and ``compiled`` are forced. The copy baseline
``y.copy_(x)`` into a preallocated tensor is timed in the same process; every cast is reported in milliseconds and
as a multiple of it (timings on these machines vary up to 2× between runs, ratios within one run are what to
compare). Every row also gives GB/s: the bytes a cast must move at least (read x, write the result: 8 per
element) over its time; the copy's figure is the practical memory bandwidth. Each figure is the best of ``--rounds``
× ``--repeat`` calls (default 16) after a warm-up call, the rows timed in turn round by round
(:func:`interleaved_ms`); the first call's time (``first_call_s``: the compile, for a compiled kernel not yet in
inductor's on-disk cache) is recorded too. A "bit cast probe" row times a compiled copy
through two vector bit casts, the machine property that decides how fast kernels reading exponent bits can be
(:func:`bit_cast_probe`). Every backend's output is checked bit-identical to the eager cast before it is timed.
``x`` and the copy's target are advised to huge pages before they are first written
(``numcast.libc.advise_huge_pages``): otherwise the copy ran at 3.5 or at 2 ms depending on whether the kernel had
yet merged their pages into huge ones. A cast's own fresh output is advised the same way by numcast
(``formats.fused.fresh_output``); the "fresh copy" row times a copy into such a new tensor, what the OS charges for
fresh pages included (on these VMs it varies from run to run), the floor under every cast that returns a new tensor.

glibc returns freed 64 MiB buffers to the OS, so every fresh output page faults on first touch (in 4 KiB pages
that cost more than the cast itself; numcast's huge-page advice cuts it to about a copy's time). ``--malloc
both`` runs the whole bench twice in subprocesses, without and with
``MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_TOP_PAD_=536870912``, and prints
both tables. When ``brevitas`` or ``torchao`` are importable their MXFP4 fake-quant is timed
alongside, after a check that they agree with numcast bit for bit (optional bench extras).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

FORMATS = ["fp8_e4m3", "fp4_e2m1", "mxfp8_e4m3", "mxfp6_e2m3", "mxfp4", "mxint8", "nvfp4", "int4_g128"]
MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "17179869184",
    "MALLOC_TRIM_THRESHOLD_": "17179869184",
    "MALLOC_TOP_PAD_": "536870912",
}


def interleaved_ms(fns: list, rounds: int, repeat: int, device: str = "cpu") -> list[tuple[float, float]]:
    """(best, median) ms of each of ``fns`` over ``rounds`` × ``repeat`` calls after a warm-up call: each round times
    every function ``repeat`` times in turn, so a slow spell of the machine (these VMs have them, seconds long)
    touches every row alike instead of one format's ten consecutive calls. On CUDA each call is timed by CUDA events
    recorded around it (the device's time from the first kernel's launch to the last one's end, host gaps between
    launches included) after the device is idle."""
    times: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(rounds):
        for ts, fn in zip(times, fns, strict=True):
            for _ in range(repeat):
                ts.append(_call_s(fn, device))
    return [(1e3 * min(ts), 1e3 * statistics.median(ts)) for ts in times]


def _call_s(fn: Callable, device: str) -> float:
    """Seconds one call of ``fn`` takes: wall clock on the CPU, CUDA events on a GPU."""
    if device == "cpu":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def bit_cast_probe(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A copy through two vector bit casts: what a vector bit cast costs in an inductor kernel on this machine
    (inductor writes it as a scalar loop through a stack buffer; some CPUs take that at a copy's speed, others at
    several times it). numcast's compiled casts avoid bit casts for this reason
    (``numcast.formats.element.round_nearest_even_arithmetic``)."""
    return y.copy_((x.view(torch.int32) >> 1).view(torch.float32))


def fresh_copy(x: torch.Tensor) -> torch.Tensor:
    """``x`` copied into a new tensor whose memory is advised to huge pages first, as numcast's casts without
    ``out=`` do (``formats.fused.fresh_output``): the copy plus what the OS charges for fresh pages, the floor under
    every cast that returns a new tensor."""
    from numcast.libc import advise_huge_pages

    out = torch.empty_like(x)
    advise_huge_pages(out)
    return out.copy_(x)


def peer_fns(x: torch.Tensor) -> dict:
    """MXFP4 / MXFP8 fake-quant of peer libraries where installed (``pip install -c constraints.txt -e .[bench]``);
    each is checked bit-identical to numcast on ``x`` before it is timed."""
    import numcast

    fns: dict = {}
    try:  # torchao's MX emulation path
        from torchao.prototype.mx_formats.mx_tensor import MXTensor

        for name, dt in (("mxfp4", torch.float4_e2m1fn_x2), ("mxfp8_e4m3", torch.float8_e4m3fn)):
            fns[f"torchao {name}"] = (name, lambda dt=dt: MXTensor.to_mx(x, dt, 32).dequantize(torch.float32))
    except Exception as exc:  # noqa: BLE001 - report whatever stops the import
        fns["torchao"] = f"not installed ({type(exc).__name__})"
    try:
        import warnings

        from brevitas.nn import QuantIdentity
        from brevitas.quant import MXFloat8e4m3Act

        warnings.filterwarnings("ignore", module="brevitas")
        for name, (eb, mb) in (("mxfp4", (2, 1)), ("mxfp8_e4m3", (4, 3))):
            quant = MXFloat8e4m3Act.let(exponent_bit_width=eb, mantissa_bit_width=mb, group_dim=1, group_size=32)
            mod = QuantIdentity(act_quant=quant, return_quant_tensor=False).eval()
            fns[f"brevitas {name}"] = (name, lambda m=mod: _no_grad(m, x))
    except Exception as exc:  # noqa: BLE001
        fns["brevitas"] = f"not installed ({type(exc).__name__})"
    for key, val in list(fns.items()):
        if isinstance(val, tuple):
            name, fn = val
            same = torch.equal(fn(), numcast.cast(x, name))
            fns[key] = (fn, "bit-identical to numcast" if same else "DIFFERS from numcast")
    return fns


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, every NaN equal to every NaN."""
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and torch.equal(a.masked_fill(nan, 0).view(torch.int32),
                                                            b.masked_fill(nan, 0).view(torch.int32))  # fmt: skip


def _no_grad(mod, x):
    with torch.no_grad():
        return mod(x)


def run(args: argparse.Namespace) -> dict:
    import numcast
    from numcast.formats import ops
    from numcast.libc import advise_huge_pages

    on_cpu = args.device == "cpu"
    if on_cpu:
        torch.set_num_threads(args.threads)
    if args.chunk_elements:
        ops.CHUNK_ELEMENTS = ops.DEVICE_CHUNK_ELEMENTS = args.chunk_elements
    g = torch.Generator().manual_seed(0)
    x, y = torch.empty(args.size, args.size), torch.empty(args.size, args.size)
    for t in (x, y):  # both in huge pages from their first touch, so the copy is timed at its best in every run
        advise_huge_pages(t)
    x.normal_(generator=g)
    x_cpu = x
    x, y = x.to(args.device), y.to(args.device).zero_()
    probe = torch.compile(bit_cast_probe)
    timed: list[tuple[dict, Callable]] = [
        ({"name": "copy (y.copy_(x))", "backend": "-"}, lambda: y.copy_(x)),
        ({"name": "fresh copy", "backend": "-", "note": "copy into a new tensor advised to huge pages (a cast's "
          "fresh output)" if on_cpu else "copy into a new tensor"}, lambda: fresh_copy(x)),
        ({"name": "bit cast probe", "backend": "compiled", "note": "y = (x.view(int32) >> 1).view(float32), machine "
          "probe"}, lambda: probe(x, y)),
    ]  # fmt: skip
    failures, untimed = [], []  # a cast that differs from the reference is reported and not timed
    for name in args.formats:
        eager = numcast.cast(x, name, backend="eager")
        if not on_cpu and not _same_bits(eager.cpu(), numcast.cast(x_cpu, name, backend="eager")):
            failures.append(f"{name}: the eager cast on {args.device} differs from the CPU's")
        for backend in args.backends:
            kw = {} if backend == "auto" else {"backend": backend}  # auto: the default call, no argument
            t0 = time.perf_counter()
            res = numcast.cast(x, name, **kw)  # warm-up / compile
            if not on_cpu:
                torch.cuda.synchronize()
            first = time.perf_counter() - t0
            if not _same_bits(res, eager):
                failures.append(f"{name}: backend {backend} differs from the eager cast")
                untimed.append({"name": name, "backend": backend, "note": "DIFFERS from the eager cast: not timed"})
                continue
            del res
            timed.append(({"name": name, "backend": backend, "first_call_s": first},
                          lambda n=name, kw=kw: numcast.cast(x, n, **kw)))  # fmt: skip
            timed.append(({"name": name, "backend": f"{backend}, out="},
                          lambda n=name, kw=kw: numcast.cast(x, n, out=y, **kw)))  # fmt: skip
        del eager
    peers = []
    for name, val in peer_fns(x).items():
        if isinstance(val, tuple):
            timed.append(({"name": name, "backend": "peer", "note": val[1]}, val[0]))
        else:
            peers.append({"name": name, "backend": "peer", "note": val})
    results = interleaved_ms([fn for _, fn in timed], args.rounds, args.repeat, args.device)
    copy_ms = results[0][0]
    moved = 2 * x.nbytes  # bytes a cast must move at least: read x, write its result
    rows = [dict(meta, ms=ms, median_ms=med, x_copy=ms / copy_ms, gb_s=moved / ms / 1e6)
            for (meta, _), (ms, med) in zip(timed, results, strict=True)] + untimed + peers  # fmt: skip
    malloc = all(os.environ.get(k) == v for k, v in MALLOC_ENV.items())
    return {
        "size": [args.size, args.size],
        "dtype": "float32",
        "device": args.device,
        "device_name": platform.processor() or platform.machine() if on_cpu else torch.cuda.get_device_name(),
        "threads": torch.get_num_threads(),
        "chunk_elements": ops.chunk_elements(x),
        "rounds": args.rounds,
        "repeat": args.repeat,
        "malloc_env": malloc,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "rows": rows,
        "failures": failures,
    }


def print_table(res: dict) -> None:
    from numcast.report.tables import make_table, print_table

    calls = res.get("rounds", 1) * res["repeat"]
    where = (f"{res['threads']} threads, glibc malloc env {'on' if res['malloc_env'] else 'off'}"
             if res.get("device", "cpu") == "cpu" else res["device_name"])  # fmt: skip
    title = f"cast of a {res['size'][0]}x{res['size'][1]} float32 tensor, {where}, best of {calls}"
    rows = [[r["name"], r["backend"], r.get("ms"), r.get("median_ms"), r.get("x_copy"), r.get("gb_s"),
             r.get("first_call_s"), r.get("note", "")] for r in res["rows"]]  # fmt: skip
    cols = ("format", "backend", "best ms", "median ms", "x copy", "GB/s", "first call s", "note")
    print_table(make_table(title, cols, rows, digits=3))


def markdown(payload: dict) -> str:
    """One Markdown table of both glibc settings side by side (the README's; a GPU run's with GB/s); of the `out=`
    rows only the default path's (`auto, out=`), the others stay in the JSON."""
    runs = payload["runs"] if "runs" in payload else [payload]
    keyed = [{(r["name"], r["backend"]): r for r in run["rows"]} for run in runs]
    head = ["format", "backend"]
    gb_s = [run.get("device", "cpu") != "cpu" for run in runs]  # a GPU's table also gives GB/s
    for run, with_gb_s in zip(runs, gb_s, strict=True):
        env = run["device_name"] if with_gb_s else "malloc env on" if run["malloc_env"] else "malloc env off"
        head += [f"ms ({env})", f"x copy ({env})"] + [f"GB/s ({env})"] * with_gb_s
    lines = ["| " + " | ".join(head + ["note"]) + " |", "|" + "---|" * (len(head) + 1)]
    for key, first in keyed[0].items():
        if key[1].endswith("out=") and key[1] != "auto, out=":
            continue
        cells = [key[0], key[1]]
        for k, with_gb_s in zip(keyed, gb_s, strict=True):
            r = k.get(key, {})
            cells += [f"{r[c]:.3g}" if c in r else "-" for c in ("ms", "x_copy", "gb_s")[: 2 + with_gb_s]]
        lines.append("| " + " | ".join(cells + [first.get("note", "")]) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--repeat", type=int, default=4, help="calls per function and round")
    p.add_argument("--formats", nargs="+", default=FORMATS)
    p.add_argument(
        "--backends", nargs="+", default=["auto", "eager", "compiled"], choices=["auto", "eager", "compiled"]
    )
    p.add_argument("--malloc", choices=["inherit", "both"], default="both", help="CPU only")
    p.add_argument("--device", default="cpu", help="cpu, or cuda: timed by CUDA events, checked against the CPU")
    p.add_argument("--chunk-elements", type=int, help="override numcast's eager chunk length (elements)")
    p.add_argument("--json", default="benchmarks/results/formats.json")
    p.add_argument("--markdown", action="store_true", help="also print the README's Markdown table")
    p.add_argument("--render", metavar="JSON", help="only print the Markdown table of a saved run")
    args = p.parse_args()
    if args.render:
        print(markdown(json.loads(Path(args.render).read_text())))
        return
    if args.malloc == "both" and args.device == "cpu":
        results = []
        for env_on in (False, True):
            env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
            if env_on:
                env.update(MALLOC_ENV)
            cmd = [sys.executable, __file__, "--malloc", "inherit", "--json", "-", "--size", str(args.size),
                   "--threads", str(args.threads), "--rounds", str(args.rounds), "--repeat", str(args.repeat),
                   "--formats", *args.formats,
                   "--backends", *args.backends]  # fmt: skip
            if args.chunk_elements:
                cmd += ["--chunk-elements", str(args.chunk_elements)]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
            res = json.loads(out[out.index("{") :])
            print_table(res)
            results.append(res)
        payload = {"runs": results}
    else:
        payload = run(args)
        if args.json == "-":
            print(json.dumps(payload))
            return
        print_table(payload)
    if args.json and args.json != "-":
        from numcast.io import write_atomic

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.json, lambda p: p.write_text(json.dumps(payload, indent=2) + "\n"))
        print(f"wrote {args.json}")
    if args.markdown:
        print(markdown(payload))
    failures = [f for res in payload.get("runs", [payload]) for f in res.get("failures", [])]
    if failures:
        raise SystemExit("bits differ:\n" + "\n".join(failures))


if __name__ == "__main__":
    main()
