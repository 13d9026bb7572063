"""The accuracy cost of an accumulator guarantee for each PTQ method numcast has (no training).

    .venv/bin/python benchmarks/accumulator_ptq.py [--model fmnist-cnn] [--ps 32 16 14 13]
        [--methods rtn gptq error-diffusion ep-init] [--rules a2q+ a2q] [--json benchmarks/results/accumulator_ptq.json]

Each cell is ``numcast quantize MODEL --weights int4_channel --activations int4 --method M --accumulator-bits P
--accumulator-rule R --calibration 128`` (in process): 4-bit per-channel weights, 4-bit inputs with static
per-tensor scales (unsigned where never negative), every layer's integer weights projected onto the budget of
a P-bit accumulator and rounded within it (the method's own solution where it already fits). P = 32 binds no
layer, so it is the method without the guarantee under the same activation quantization. The table shows
the quantized top-1 and the largest accumulator width any layer needs (≤ P by construction, from the report).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from numcast.jobs import run_ptq
from numcast.pipeline.recipe import Recipe


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="fmnist-cnn")
    ap.add_argument("--ps", type=int, nargs="+", default=[32, 16, 14, 13])
    ap.add_argument("--methods", nargs="+", default=["rtn", "gptq", "error-diffusion", "ep-init"])
    ap.add_argument("--rules", nargs="+", default=["a2q+", "a2q"])
    ap.add_argument("--calibration", type=int, default=128)
    ap.add_argument("--json", default="benchmarks/results/accumulator_ptq.json")
    ap.add_argument("--markdown", action="store_true", help="only print the table of the saved --json")
    args = ap.parse_args(argv)
    path = Path(args.json)
    if args.markdown:
        print(markdown(json.loads(path.read_text())))
        return 0
    rows = []
    for rule in args.rules:
        for P in args.ps:
            for method in args.methods:
                recipe = Recipe(weights="int4_channel", activations="int4", method=method, calibration=args.calibration,
                                accumulator={"bits": P, "rule": rule})  # fmt: skip
                with tempfile.TemporaryDirectory() as tmp:
                    rec = run_ptq(args.model, recipe, Path(tmp) / "q", progress=False)
                m = rec["metrics"]
                need = max(r["accumulator_bits"] for r in rec["layers"] if r["action"] == "quantized")
                rows.append({"model": rec["model"], "rule": rule, "P": P, "method": method,
                             "metric": rec["primary_metric"], "float": m["float"][rec["primary_metric"]],
                             "quantized": m["quantized"][rec["primary_metric"]], "max_bits_needed": need,
                             "quantize_s": rec["wall_time_s"]["quantize"]})  # fmt: skip
                print(f"{rule:5s} P={P:2d} {method:16s} {rows[-1]['quantized']:.4f} (needs {need})", flush=True)
    data = {"settings": vars(args), "rows": rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    print(markdown(data))
    return 0


def markdown(data: dict) -> str:
    rows = data["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["rule"], r["P"], r["method"]): r for r in rows}
    fl = rows[0]["float"] if rows else None
    lines = [f"{rows[0]['model']}, float {rows[0]['metric']} {fl:.4f}" if rows else "", "",
             "| rule | P | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]  # fmt: skip
    for rule, P in dict.fromkeys((r["rule"], r["P"]) for r in rows):
        cells = [by.get((rule, P, m)) for m in methods]
        vals = [f"{c['quantized']:.4f} ({c['max_bits_needed']})" if c else "-" for c in cells]
        lines.append(f"| {rule} | {P} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
