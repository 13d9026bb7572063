"""Weight-only RTN's quantize phase against the model's float evaluation, as ``numcast quantize`` reports them.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/rtn_weight_only.py [--model smollm2-135m] [--format mxfp4]
        [--runs 3] [--json benchmarks/results/rtn_weight_only.json]

Each run is a fresh ``numcast quantize MODEL --weights FORMAT`` process (the CLI users call: load, float
evaluation, the data-free quantize phase, quantized evaluation, outputs) into a temporary directory; the figures
are its ``report.json`` ``wall_time_s`` entries ``quantize`` and ``evaluate_float`` (seconds) and their ratio
(issue 17's goal: at most 0.10). Prints a Markdown table and writes JSON. Timings: run it with nothing else on the
machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path


def one_run(model: str, fmt: str) -> dict:
    """One CLI process; its report's phase times (s)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        cli = [sys.executable, "-m", "numcast", "quantize", model, "--weights", fmt, "--out", str(out)]
        subprocess.run(cli, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        wall = json.loads((out / "report.json").read_text())["wall_time_s"]
    return {"quantize_s": wall["quantize"], "evaluate_float_s": wall["evaluate_float"],
            "ratio": wall["quantize"] / wall["evaluate_float"]}  # fmt: skip


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else the platform's machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--format", default="mxfp4")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/rtn_weight_only.json"))
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    runs = [one_run(args.model, args.format) for _ in range(args.runs)]
    cpu = cpu_name()
    print(f"{args.model}, {args.format}, {cpu}, {os.cpu_count()} cores")
    print("| run | quantize (s) | float evaluation (s) | ratio |")
    print("|---|---|---|---|")
    for i, r in enumerate(runs, 1):
        print(f"| {i} | {r['quantize_s']:.3f} | {r['evaluate_float_s']:.2f} | {r['ratio']:.3f} |")
    record = {"model": args.model, "format": args.format, "cpu": cpu, "cpu_count": os.cpu_count(), "runs": runs}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_name(args.json.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(args.json)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
