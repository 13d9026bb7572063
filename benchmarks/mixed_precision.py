"""Mixed precision at equal size: lossy-coding-length allocation vs the sensitivity baseline vs uniform.

    .venv/bin/python benchmarks/mixed_precision.py [--models fmnist-cnn mobilenet-v2 ...]
        [--candidates int2_g64 int3_g64 int4_g128 int8_channel] [--uniform int3_g64 int4_g128]
        [--method rtn] [--json benchmarks/results/mixed_precision.json]

For each model, each uniform candidate is run first (every layer in that format, RTN unless ``--method``);
its achieved bits per parameter (scales included) is then the budget of an ``lcl`` and a ``sensitivity``
allocation over all candidates, so the three rows of a group have (at most) the same size. Each cell is
``numcast quantize`` in process; the table shows the primary metric, the bits per parameter (scales
included) and how many layers each allocation put in each candidate, cheapest first.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from numcast.jobs import run_ptq
from numcast.pipeline.recipe import Recipe


def _run(model: str, recipe: Recipe) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        rec = run_ptq(model, recipe, Path(tmp) / "q", progress=False)
    p = rec["primary_metric"]
    formats = {r["name"]: r["weight_format"] for r in rec["layers"] if r["action"] == "quantized"}
    return {"model": rec["model"], "metric": p, "float": rec["metrics"]["float"][p],
            "quantized": rec["metrics"]["quantized"][p], "bits_per_param": rec["bits_per_param"],
            "quantize_s": rec["wall_time_s"]["quantize"], "formats": formats}  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["fmnist-cnn", "minilm-l6", "mobilenet-v2", "efficientnet-lite0"])
    ap.add_argument("--candidates", nargs="+", default=["int2_g64", "int3_g64", "int4_g128", "int8_channel"])
    ap.add_argument("--uniform", nargs="+", default=["int3_g64", "int4_g128"])
    ap.add_argument("--method", default="rtn")
    ap.add_argument("--calibration", type=int, default=128)
    ap.add_argument("--json", default="benchmarks/results/mixed_precision.json")
    ap.add_argument("--markdown", action="store_true", help="only print the table of the saved --json")
    args = ap.parse_args(argv)
    path = Path(args.json)
    if args.markdown:
        saved = json.loads(path.read_text())
        print(markdown(saved["rows"], saved["settings"]["candidates"]))
        return 0
    rows = []
    for model in args.models:
        for fmt in args.uniform:
            base = dict(weights=fmt, method=args.method, calibration=args.calibration)
            u = _run(model, Recipe(**base))
            rows.append({**u, "strategy": "uniform", "group": fmt})
            print(f"{model} uniform {fmt}: {u['quantized']:.4f} at {u['bits_per_param']:.3f} bits", flush=True)
            for strategy in ("lcl", "sensitivity"):
                mp = {"strategy": strategy, "candidates": args.candidates, "budget": f"{u['bits_per_param']}bits"}
                r = _run(model, Recipe(**base, mixed_precision=mp))
                rows.append({**r, "strategy": strategy, "group": fmt})
                print(f"{model} {strategy} at {fmt}'s size: {r['quantized']:.4f} at {r['bits_per_param']:.3f} bits",
                      flush=True)  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2))
    print(markdown(rows, args.candidates))
    return 0


def _mix(r: dict, candidates: list[str]) -> str:
    """Layers per candidate format, cheapest first (``1/1/6/4``)."""
    chosen = list(r["formats"].values())
    return "/".join(str(chosen.count(c)) for c in candidates)


def markdown(rows: list[dict], candidates: list[str]) -> str:
    lines = ["| model | size of | metric | float | uniform | LCL | sensitivity | LCL layers per candidate | "
             "sensitivity layers per candidate |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    groups = dict.fromkeys((r["model"], r["group"]) for r in rows)
    by = {(r["model"], r["group"], r["strategy"]): r for r in rows}
    for model, g in groups:
        cells = []
        for s in ("uniform", "lcl", "sensitivity"):
            r = by.get((model, g, s))
            cells.append(f"{r['quantized']:.4f} ({r['bits_per_param']:.3f} b)" if r else "-")
        u = by[(model, g, "uniform")]
        mixes = [_mix(by[(model, g, s)], candidates) if (model, g, s) in by else "-" for s in ("lcl", "sensitivity")]
        lines.append(f"| {model} | {g} | {u['metric']} | {u['float']:.4f} | " + " | ".join(cells + mixes) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
