"""llama.cpp runs numcast's GGUF exports: SmolLM2-135M quantized by RTN, GPTQ and Error Diffusion to MXFP4, NVFP4
and llama.cpp's own Q4_0 grid (``gguf_q4_0``), exported with ``numcast export --to gguf``, measured by
``llama-perplexity`` beside numcast's own perplexity of the same quantized model under the same protocol
(:func:`numcast.evaluate.text.chunked_perplexity`: the same token ids from ``llama-tokenize``, windows of 512,
second half scored).

    .venv/bin/python benchmarks/gguf_perplexity.py [--formats mxfp4 nvfp4 gguf_q4_0] [--methods rtn gptq
        error-diffusion] [--calibration 16] [--chunks 16] [--json benchmarks/results/gguf_perplexity.json]

Needs llama.cpp's tools (``scripts/build_llama_cpp.sh``). Each cell runs ``numcast quantize`` in its own process
(outputs under ``--work``), then exports and measures here. "gap" is llama.cpp / numcast − 1: llama.cpp
quantizes activations to Q8 inside its CPU dot products, so its perplexity is not numcast's bit for bit; the
weights are (the CI test ``tests/interop/test_to_gguf.py`` decodes every tensor).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MODEL = "smollm2-135m"


def quantize(fmt: str, method: str, calibration: int, work: Path) -> Path:
    out = work / f"{MODEL}__{fmt}__{method}"
    cmd = [sys.executable, "-m", "numcast.cli", "quantize", MODEL, "--weights", fmt, "--method", method,
           "--calibration", str(calibration), "--out", str(out), "--overwrite", "--no-progress", "--json"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-800:]}{proc.stderr[-800:]}")
    return out


def measure(run: Path | None, fmt: str, method: str, text: Path, chunks: int, work: Path) -> dict:
    """Export ``run`` (None: the float model's own GGUF, the shipped file) and measure both perplexities."""
    import gguf
    import torch

    from numcast.evaluate.text import chunked_perplexity
    from numcast.interop import llama_cpp
    from numcast.jobs import export
    from numcast.pipeline.export import MODEL_FILE, load_quantized
    from numcast.workloads import load_workload

    w = load_workload(MODEL)
    if run is None:
        path = w.source  # the shipped GGUF (Q4_1), which the float model de-quantizes exactly
        t_export = 0.0
    else:
        load_quantized(w.model, run / MODEL_FILE)
        t0 = time.perf_counter()
        path = export(run, "gguf", work / f"{run.name}.gguf", overwrite=True).path
        t_export = time.perf_counter() - t0
    ids = llama_cpp.tokenize(path, text)
    add_bos = bool(gguf.GGUFReader(str(path)).fields["tokenizer.ggml.add_bos_token"].contents())
    bos = w.tokenizer.bos_token_id if add_bos else None
    with torch.no_grad():
        ours = chunked_perplexity(w.model, ids, 512, chunks, bos)
    t0 = time.perf_counter()
    theirs = llama_cpp.perplexity(path, text, 512, chunks)
    row = {"format": fmt, "method": method, "numcast_ppl": ours, "llama_cpp_ppl": theirs,
           "gap": theirs / ours - 1, "gguf_bytes": path.stat().st_size, "export_s": t_export,
           "llama_cpp_s": time.perf_counter() - t0}  # fmt: skip
    if run is not None:
        rec = json.loads((run / "report.json").read_text())
        row["numcast_ppl_workload"] = rec["metrics"]["quantized"]["perplexity"]
    print(f"{fmt:10s} {method:16s} numcast {ours:8.3f}  llama.cpp {theirs:8.3f}  gap {row['gap']:+.2%}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", nargs="+", default=["mxfp4", "nvfp4", "gguf_q4_0"])
    ap.add_argument("--methods", nargs="+", default=["rtn", "gptq", "error-diffusion"])
    ap.add_argument("--calibration", type=int, default=16, help="calibration windows of 512 tokens")
    ap.add_argument("--chunks", type=int, default=16, help="evaluation windows of 512 tokens")
    ap.add_argument("--work", type=Path, default=Path("out/bench-gguf"))
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/gguf_perplexity.json"))
    args = ap.parse_args()
    from numcast.evaluate.text import wiki_split
    from numcast.report.records import json_text

    args.work.mkdir(parents=True, exist_ok=True)
    text = args.work / "eval.txt"
    text.write_text("\n\n".join(wiki_split()[1]))  # the evaluation articles, never seen in calibration
    rows = [measure(None, "float (shipped Q4_1)", "-", text, args.chunks, args.work)]
    for fmt in args.formats:
        for method in args.methods:
            t0 = time.perf_counter()
            run = quantize(fmt, method, args.calibration, args.work)
            rows.append({**measure(run, fmt, method, text, args.chunks, args.work),
                         "quantize_run_s": time.perf_counter() - t0})  # fmt: skip
    worst = max(abs(r["gap"]) for r in rows)
    print("\n| format | method | numcast ppl | llama.cpp ppl | gap |\n|---|---|---|---|---|")
    for r in rows:
        ppl = f"{r['numcast_ppl']:.3f} | {r['llama_cpp_ppl']:.3f}"
        print(f"| {r['format']} | {r['method']} | {ppl} | {r['gap']:+.2%} |")
    print(f"\nlargest |gap|: {worst:.2%} ({args.chunks} windows of 512 tokens, calibration {args.calibration})")
    record = {"model": MODEL, "chunks": args.chunks, "n_ctx": 512, "calibration": args.calibration,
              "largest_abs_gap": worst, "rows": rows}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json_text(record))


if __name__ == "__main__":
    main()
