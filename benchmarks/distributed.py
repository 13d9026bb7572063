"""One process against ``torchrun --nproc-per-node 2`` (gloo, CPU): the same ``numcast quantize`` command line,
run once as one process (2 intra-op threads) and once as 2 ranks (torchrun's default of 1 thread per rank), one
after the other. Records whether the two wrote the same ``model.safetensors`` byte for byte (SHA-256), each
run's ``report.json`` wall time per phase, ``world_size`` and ``calibration_samples_per_rank``.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/distributed.py [--cases fmnist-cnn:gptq:int4_channel:256 ...]
        [--json benchmarks/results/distributed.json]

A case is ``MODEL:METHOD:FORMAT:CALIBRATION``. On a 2-core machine two ranks share the same two cores one
process already uses, so the 2-rank wall time says what the split and the reductions cost, not what more
devices would gain: the work is CPU-bound here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_CASES = ["fmnist-cnn:gptq:int4_channel:512", "fmnist-cnn:error-diffusion:int4_channel:512",
                 "smollm2-135m:gptq:mxfp4:8", "smollm2-135m:error-diffusion:mxfp4:8"]  # fmt: skip
PHASES = ["load", "calibration", "quantize", "evaluate", "evaluate_float", "total"]


def run(ranks: int, model: str, method: str, fmt: str, calibration: int, out: Path) -> dict:
    """One ``numcast quantize`` run (``ranks`` 1: a plain process; else torchrun); its report and file hash."""
    args = ["-m", "numcast", "quantize", model, "--weights", fmt, "--method", method,
            "--calibration", str(calibration), "--out", str(out)]  # fmt: skip
    if ranks > 1:
        args = ["-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--standalone", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{(proc.stdout + proc.stderr)[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    digest = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    return {"ranks": ranks, "command_s": seconds, "wall_time_s": report["wall_time_s"],
            "world_size": report["world_size"], "calibration_samples_per_rank": report["calibration_samples_per_rank"],
            "model_sha256": digest}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="MODEL:METHOD:FORMAT:CALIBRATION")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/distributed.json"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="numcast-bench-dist-") as tmp:
        for case in args.cases:
            model, method, fmt, calibration = case.split(":")
            runs = [run(n, model, method, fmt, int(calibration), Path(tmp) / f"{len(rows)}-{n}") for n in (1, 2)]
            row = {"model": model, "method": method, "format": fmt, "calibration": int(calibration), "runs": runs,
                   "identical_model_file": runs[0]["model_sha256"] == runs[1]["model_sha256"]}  # fmt: skip
            rows.append(row)
            print(f"{case}: identical {row['identical_model_file']}, quantize "
                  f"{runs[0]['wall_time_s']['quantize']:.1f} s (1) vs {runs[1]['wall_time_s']['quantize']:.1f} s (2)",
                  flush=True)  # fmt: skip
    print("\n| model | method | format | calibration | ranks | samples per rank | identical file | "
          + " | ".join(f"{p} (s)" for p in PHASES) + " |\n|" + "---|" * (7 + len(PHASES)))
    for row in rows:
        for r in row["runs"]:
            phases = " | ".join(f"{r['wall_time_s'].get(p, float('nan')):.1f}" for p in PHASES)
            print(f"| {row['model']} | {row['method']} | {row['format']} | {row['calibration']} | {r['ranks']} | "
                  f"{r['calibration_samples_per_rank']} | {'yes' if row['identical_model_file'] else 'no'} | "
                  f"{phases} |")  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"cpu_count": len(os.sched_getaffinity(0)), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
