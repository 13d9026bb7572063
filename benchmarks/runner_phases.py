"""Where the block runner's time goes, per phase, for one method on SmolLM2's first blocks.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/runner_phases.py [--methods gptq error-diffusion]
        [--format mxfp4] [--blocks 4] [--calibration 32] [--json benchmarks/results/runner_phases.json]

Each phase is a method of the runner (or of the statistics and solvers) wrapped in a wall-clock timer for the
run: ``float pass`` (:meth:`Streams.float_pass`, two-stream methods), ``feed`` (the quantized stream's partial
block forwards per group, statistics included) with ``statistics`` (``add`` of the Hessian or the two Gram
matrices) inside it, ``solve`` with ``column casts`` inside it, ``advance`` (both streams through the finished
block, the layers' SQNR) and the RTN guard's stream (``guard``). Phases nest as indented; the rest of the
total is the runner's own work (capturing the first block's inputs, opening blocks, installing layers).
Prints a Markdown table and writes JSON. Timings: run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import time
from pathlib import Path

import torch

from numcast.algorithms import columns
from numcast.pipeline import layer_stats, methods, runner
from numcast.pipeline.recipe import Recipe
from numcast.workloads import load_workload

PHASES = [  # (owner, method name, phase label)
    (runner.Streams, "float_pass", "float pass"),
    (runner.Streams, "feed", "feed"),
    (layer_stats.HessianStatistics, "add", "  statistics"),
    (layer_stats.GramStatistics, "add", "  statistics"),
    (methods.GPTQ, "solve", "solve"),
    (methods.ErrorDiffusion, "solve", "solve"),
    (columns.ColumnQuantizer, "quantize", "  column casts"),
    (runner.Streams, "advance", "advance"),
    (runner.RTNGuard, "advance", "guard"),
]


def timed(owner, name: str, label: str, totals: collections.Counter):
    """Wrap ``owner.name`` so its wall time adds to ``totals[label]``; returns the original (to restore)."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[label] += time.perf_counter() - t0

    setattr(owner, name, wrapper)
    return original


def profile(method: str, fmt: str, n_blocks: int, calibration: int) -> dict:
    """One run of ``method`` on SmolLM2's first ``n_blocks`` blocks; {phase: seconds} and the total."""
    w = load_workload("smollm2-135m")
    batches = w.calibration(calibration)
    totals: collections.Counter = collections.Counter()
    originals = [(owner, name, timed(owner, name, label, totals)) for owner, name, label in PHASES]
    try:
        t0 = time.perf_counter()
        recipe = Recipe(weights=fmt, method=method, calibration=calibration)
        runner.quantize_blockwise(w.model, w.blocks(w.model)[:n_blocks], batches, recipe, progress=False)
        total = time.perf_counter() - t0
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)
    return {"method": method, "total_s": total, "phases_s": dict(totals)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["gptq", "error-diffusion"])
    p.add_argument("--format", default="mxfp4")
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--calibration", type=int, default=32)
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/runner_phases.json"))
    args = p.parse_args()
    torch.set_num_threads(2)
    rows = [profile(m, args.format, args.blocks, args.calibration) for m in args.methods]
    labels = list(dict.fromkeys(label for _, _, label in PHASES))
    print(f"SmolLM2 first {args.blocks} blocks, {args.format}, {args.calibration} windows: seconds")
    print("| phase | " + " | ".join(r["method"] for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for label in labels:
        print(f"| {label} | " + " | ".join(f"{r['phases_s'].get(label, 0.0):.1f}" for r in rows) + " |")
    print("| **total** | " + " | ".join(f"{r['total_s']:.1f}" for r in rows) + " |")
    meta = {"model": "smollm2-135m", "format": args.format, "blocks": args.blocks, "calibration": args.calibration}
    args.json.write_text(json.dumps({**meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
