"""How often ordinary data meets the near-ties that a float32 quotient x/s decided wrongly before float64 work.

    .venv/bin/python benchmarks/near_ties.py [--formats nvfp4 int8_channel ...] [--size 4096] [--seeds 4]
        [--json benchmarks/results/near_ties.json]

Formats whose scale is not a power of two round x/s once to their work dtype (``numcast.formats.element.work_dtype``)
before the element rounding. Until the rule counted the scale's significant bits, NVFP4 and the FP32-scaled formats
rounded a float32 quotient, which decides the wrong way when x/s lies within about half a float32 ulp of a rounding
decision point (``tests/formats/test_near_ties.py`` builds such inputs). This script casts ``size`` × ``size``
standard normal tensors (``--seeds`` of them) both ways, the eager cast as it is and the same cast with its work dtype
forced to float32, and counts the elements whose results differ: what the old rule changed on random data.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from unittest import mock

import torch

FORMATS = ["nvfp4", "int8_channel", "int4_channel", "fp8_e4m3_tensor", "int4_g128", "mxfp4"]


def float32_quotient_cast(x: torch.Tensor, name: str) -> torch.Tensor:
    """The eager cast of float32 ``x`` with the element work done in float32 (the rule before float64 work)."""
    from numcast.formats import engine
    from numcast.formats.registry import get_format

    fmt = get_format(name)
    with mock.patch.object(engine, "work_dtype", lambda *args, **kwargs: torch.float32):
        return engine.grid_cast(x, fmt).output(x.shape, x.dtype)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", nargs="+", default=FORMATS)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--json", default="benchmarks/results/near_ties.json")
    args = p.parse_args()
    import numcast
    from numcast.formats.element import work_dtype
    from numcast.formats.registry import get_format
    from numcast.io import write_atomic

    rows = []
    print(f"| format | work dtype | elements differing in {args.seeds} × {args.size}² normals | per million |")
    print("|---|---|---|---|")
    for name in args.formats:
        fmt = get_format(name)
        differing = 0
        for seed in range(args.seeds):
            x = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(seed))
            now = numcast.cast(x, name, backend="eager")
            differing += int((now.view(torch.int32) != float32_quotient_cast(x, name).view(torch.int32)).sum())
        total = args.seeds * args.size * args.size
        work = str(work_dtype(fmt.element, fmt.scaling)).removeprefix("torch.")
        rows.append({"format": name, "work_dtype": work, "differing": differing, "elements": total})
        print(f"| {name} | {work} | {differing} | {differing / total * 1e6:.3g} |")
    if args.json:
        payload = {"size": [args.size, args.size], "seeds": args.seeds, "torch": torch.__version__, "rows": rows}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.json, lambda q: q.write_text(json.dumps(payload, indent=2) + "\n"))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
