"""The PTQ table: models × weight formats × methods, with the quality metric, packed size, wall time and
peak memory of each run.

    .venv/bin/python benchmarks/ptq.py [--models ...] [--formats ...] [--methods rtn gptq error-diffusion]
                                       [--calibration N] [--json benchmarks/results/ptq.json] [--update]
                                       [--markdown]

Every cell runs ``numcast quantize`` in its own process (so peak memory is that run's), writes its report
under ``--work`` and is collected into one table and JSON; ``--update`` replaces the cells it ran in an
existing JSON and keeps the others (so the table can be filled model by model). ``--models`` takes short names
or paths of local models (a ``.gguf`` file or a Hugging Face folder; named by their file name). Methods are ``rtn``,
``gptq``, ``error-diffusion`` (defaults: static block scales, strongest inputs first, damping 0.01, RTN guard) and
its ablations ``error-diffusion-nodamp`` (no damping: the paper's method), ``error-diffusion-noguard`` (no RTN
guard), ``error-diffusion-dynamic`` (block scales from the updated targets), ``error-diffusion-natural`` (GPFQ's
natural column order, dynamic scales),
``error-diffusion-weak`` (weakest inputs first) and
``error-diffusion-refit`` (layers kept in float by
``--exclude`` re-fitted with Q = identity: the ablation of Error Diffusion's layer calibration), and
``attention-round`` / ``attention-round-sampled`` (the soft and the sampled variant) and
``attention-round-i100`` (100 steps per block instead of 500, for the ImageNet CNNs on the CPU);
``rtn-bf16`` / ``gptq-bf16`` / ``error-diffusion-bf16`` load the model in bfloat16 (``--dtype bfloat16``; the
float column is then the bfloat16 model's). The "gap closed" column is (method − RTN) / (float − RTN) for the
same model and format.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MODELS = ["fmnist-cnn", "minilm-l6", "mobilenet-v2", "efficientnet-lite0", "smollm2-135m"]
FORMATS = ["mxfp4", "mxfp6_e2m3", "nvfp4", "int4_g128", "int3_g64", "mxint8"]
METHODS = ["rtn", "gptq", "error-diffusion"]
METHOD_ARGS = {
    "rtn": ["--method", "rtn"],
    "gptq": ["--method", "gptq"],
    "error-diffusion": ["--method", "error-diffusion"],
    "error-diffusion-nodamp": ["--method", "error-diffusion", "--ed-damp", "0"],
    "error-diffusion-dynamic": ["--method", "error-diffusion", "--ed-scale-rule", "dynamic"],
    "error-diffusion-natural": ["--method", "error-diffusion", "--ed-scale-rule", "dynamic", "--ed-order", "natural"],
    "error-diffusion-weak": ["--method", "error-diffusion", "--ed-order", "weak-first"],
    "error-diffusion-refit": ["--method", "error-diffusion", "--ed-calibrate-float-layers"],
    "error-diffusion-noguard": ["--method", "error-diffusion", "--no-ed-rtn-guard"],
    "attention-round": ["--method", "attention-round"],
    "attention-round-sampled": ["--method", "attention-round", "--ar-variant", "sampled"],
    "attention-round-i100": ["--method", "attention-round", "--ar-iterations", "100"],
    "rtn-bf16": ["--method", "rtn", "--dtype", "bfloat16"],  # the model loaded in bfloat16 (statistics as before)
    "gptq-bf16": ["--method", "gptq", "--dtype", "bfloat16"],
    "error-diffusion-bf16": ["--method", "error-diffusion", "--dtype", "bfloat16"],
}


def cell_name(model: str) -> str:
    """A model's name in cell folders and tables: a short name, or a local model's file or folder name."""
    return Path(model).stem if "/" in model else model


def run_cell(model: str, fmt: str, method: str, calibration: int, work: Path, exclude: list[str]) -> dict:
    out = work / f"{cell_name(model)}__{fmt}__{method}"
    cmd = [sys.executable, "-m", "numcast.cli", "quantize", model, "--weights", fmt, *METHOD_ARGS[method],
           "--calibration", str(calibration), "--out", str(out), "--overwrite", "--no-progress", "--json"]  # fmt: skip
    if exclude:
        cmd += ["--exclude", *exclude]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"model": model, "format": fmt, "method": method, "error": proc.stdout[-500:] + proc.stderr[-500:]}
    return {**row_of(model, fmt, method, calibration, out), "total_s": time.perf_counter() - t0}


def row_of(model: str, fmt: str, method: str, calibration: int, out: Path) -> dict:
    """The table row of one finished cell, from its report.json."""
    rec = json.loads((out / "report.json").read_text())
    p = rec["primary_metric"]
    return {
        "model": cell_name(model),
        "format": fmt,
        "method": method,
        "calibration": calibration,
        "metric": p,
        "float": rec["metrics"]["float"][p],
        "quantized": rec["metrics"]["quantized"][p],
        "metrics": rec["metrics"],
        "size_bytes": rec["size_bytes"],
        "bits_per_param": rec["bits_per_param"],
        "quantize_s": rec["wall_time_s"]["quantize"],
        "peak_rss_mb": rec["peak_rss_mb"],
        "peak_rss_mb_by_phase": rec.get("peak_rss_mb_by_phase"),
        "notes": rec["notes"],
    }


def _key(r: dict) -> tuple:
    return r["model"], r["format"], r["method"]


def gap_closed(r: dict, rows: list[dict]) -> float | None:
    """(r − RTN) / (float − RTN) for r's model and format; None for RTN itself or without an RTN row."""
    rtn = next((x for x in rows if _key(x) == (r["model"], r["format"], "rtn") and "error" not in x), None)
    if rtn is None or r["method"] == "rtn" or rtn["float"] == rtn["quantized"]:
        return None
    return (r["quantized"] - rtn["quantized"]) / (rtn["float"] - rtn["quantized"])


def markdown(rows: list[dict]) -> str:
    head = ["model", "format", "method", "metric", "float", "quantized", "gap closed", "other metrics (quantized)",
            "packed MB", "bits/param", "quantize s", "peak MiB (quantize)"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['format']} | {r['method']} | error |" + " |" * (len(head) - 4))
            continue
        others = ", ".join(f"{k} {v:.4g}" for k, v in r["metrics"]["quantized"].items() if k != r["metric"])
        gap = gap_closed(r, rows)
        phases = r.get("peak_rss_mb_by_phase") or {}
        peak = f"{r['peak_rss_mb']:.0f}" + (f" ({phases['quantize']:.0f})" if "quantize" in phases else "")
        cells = [r["model"], r["format"], r["method"], r["metric"], f"{r['float']:.4g}", f"{r['quantized']:.4g}",
                 "" if gap is None else f"{100 * gap:.0f} %", others, f"{r['size_bytes']['packed'] / 1e6:.2f}",
                 f"{r['bits_per_param']:.3g}", f"{r['quantize_s']:.0f}", peak]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def side_by_side(rows: list[dict], methods: list[str]) -> str:
    """One line per model and format, the primary metric of each method in ``methods`` side by side (blank where
    the cell was not run), with the calibration samples and the metric's direction."""
    cells = {_key(r): r for r in rows if "error" not in r}
    pairs = list(dict.fromkeys((r["model"], r["format"]) for r in rows))
    head = ["model", "format", "metric", "calibration", *methods]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    wins = {m: [0, 0] for m in methods[:-1]}  # the last method against each other one: [at least as good, cells]
    for model, fmt in pairs:
        got = [cells.get((model, fmt, m)) for m in methods]
        if sum(g is not None for g in got) < 2:
            continue
        first = next(g for g in got if g is not None)
        lower_is_better = first["metric"] == "perplexity"
        values = ["" if g is None else f"{g['quantized']:.4f}" for g in got]
        lines.append(f"| {model} | {fmt} | {first['metric']} {'↓' if lower_is_better else '↑'} | "
                     f"{first['calibration']} | " + " | ".join(values) + " |")  # fmt: skip
        last = got[-1]
        for m, other in zip(methods[:-1], got[:-1], strict=True):
            if last is not None and other is not None:
                sign = -1 if lower_is_better else 1
                wins[m][0] += sign * (last["quantized"] - other["quantized"]) >= 0
                wins[m][1] += 1
    lines.append("")
    lines += [f"{methods[-1]} at least as good as {m}: {w} of {n} cells" for m, (w, n) in wins.items() if n]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--formats", nargs="+", default=FORMATS)
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--calibration", type=int, default=128)
    p.add_argument("--work", default="benchmarks/results/ptq_runs")
    p.add_argument("--json", default="benchmarks/results/ptq.json")
    p.add_argument("--exclude", nargs="+", default=[], help="module globs every cell keeps in float")
    p.add_argument("--update", action="store_true", help="replace the cells run here in an existing --json")
    p.add_argument("--collect", action="store_true", help="do not run: collect the cells already under --work")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--render", metavar="JSON", help="only print the Markdown table of a saved run (--models filter)")
    p.add_argument("--side-by-side", action="store_true",
                   help="with --render: one line per model and format, the --methods' primary metric as columns")
    args = p.parse_args()
    if args.render:
        rows = json.loads(Path(args.render).read_text())["rows"]
        keep = [r for r in rows if r["model"] in args.models and r["method"] in args.methods]
        keep = [r for r in keep if r["format"] in args.formats]
        print(side_by_side(keep, args.methods) if args.side_by_side else markdown(keep))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in args.models:
        for fmt in args.formats:
            for method in args.methods:
                if args.collect:
                    cell = work / f"{cell_name(model)}__{fmt}__{method}"
                    if not (cell / "report.json").is_file():
                        continue
                    r = row_of(model, fmt, method, args.calibration, cell)
                else:
                    r = run_cell(model, fmt, method, args.calibration, work, args.exclude)
                rows.append(r)
                status = r.get("error", "").splitlines()[-1:] if "error" in r else f"{r['quantized']:.4g}"
                print(f"{model:20s} {fmt:12s} {method:5s} -> {status}", flush=True)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.update and out.is_file():
        ran = {_key(r) for r in rows}
        old = [r for r in json.loads(out.read_text())["rows"] if _key(r) not in ran]
        rank = {x: i for i, x in enumerate(MODELS + FORMATS + list(METHOD_ARGS))}
        rows = sorted(old + rows, key=lambda r: tuple((rank.get(k, 99), k) for k in _key(r)))
    out.write_text(json.dumps({"rows": rows}, indent=2))
    print(f"wrote {args.json}")
    if args.markdown:
        print(markdown(rows))


if __name__ == "__main__":
    main()
