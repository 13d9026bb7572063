"""Exhaustive check of the compiled kernels' rounding: every one of the 2^32 float32 bit patterns cast to each
listed element format by ``round_nearest_even_arithmetic`` inside ``torch.compile`` (what the compiled and
``auto`` casts run) and by the exponent-bit path (what eager runs), bit for bit, NaNs equal to NaNs.

    .venv/bin/python scripts/verify_arithmetic_rounding.py [--formats fp4_e2m1 fp8_e4m3 ...]

About 2.5–4 minutes per format on 2 CPU cores; prints the mismatches per format and exits 1 if any. The test suite
checks every float32 binade (``tests/formats/test_element.py``); this script is the exhaustive version.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from numcast.formats.element import arithmetic_rounding_exact, cast_element, work_dtype
from numcast.formats.registry import get_format

CHUNK = 1 << 26


def mismatches(name: str) -> int:
    elem = get_format(name).element
    if work_dtype(elem) != torch.float32 or not arithmetic_rounding_exact(elem, torch.float32):
        raise SystemExit(f"{name}: the compiled float32 kernels do not use the arithmetic rounding for it")
    torch._dynamo.reset()  # a fresh compile per format: a recompile of the same lambda made dynamo break the graph
    fast = torch.compile(lambda x: cast_element(x, elem, saturate=True, arithmetic=True), fullgraph=True)
    bad = 0
    for start in range(0, 1 << 32, CHUNK):
        x = torch.arange(start, start + CHUNK, dtype=torch.int64).to(torch.int32).view(torch.float32)
        ours, ref = fast(x), cast_element(x, elem, saturate=True, arithmetic=False)
        nan = ours.isnan()
        bad += int((nan != ref.isnan()).sum()) + int((ours.view(torch.int32) != ref.view(torch.int32))[~nan].sum())
    return bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", nargs="+", default=["fp4_e2m1", "fp6_e2m3", "fp6_e3m2", "fp8_e4m3", "fp8_e5m2"])
    args = ap.parse_args()
    total = 0
    for name in args.formats:
        t0 = time.perf_counter()
        bad = mismatches(name)
        total += bad
        print(f"{name}: {bad} mismatches over all 2^32 float32 inputs ({time.perf_counter() - t0:.0f} s)", flush=True)
    sys.exit(1 if total else 0)


if __name__ == "__main__":
    main()
