"""llama.cpp runs numcast's GGUF exports: SmolLM2-135M quantized by RTN, GPTQ and Error Diffusion to MXFP4, NVFP4
and llama.cpp's own Q4_0 grid (``gguf_q4_0``), exported with ``numcast export --to gguf``, measured by
``llama-perplexity`` beside numcast's own perplexity of the same quantized model under the same protocol
(:func:`numcast.evaluate.text.chunked_perplexity`: the same token ids from ``llama-tokenize``, windows of 512,
second half scored).

    .venv/bin/python benchmarks/gguf_perplexity.py [--formats mxfp4 nvfp4 gguf_q4_0] [--methods rtn gptq
        error-diffusion] [--calibration 8] [--chunks 8] [--json benchmarks/results/gguf_perplexity.json] [--update]

Needs llama.cpp's tools (``scripts/build_llama_cpp.sh``). Each cell quantizes a fresh model here (the calibration
windows of the ``smollm2-135m`` workload), exports it under ``--work`` and measures. "gap" is llama.cpp /
numcast − 1: llama.cpp quantizes activations to Q8 inside its CPU dot products, so its perplexity is not
numcast's bit for bit; the weights are (the CI test ``tests/interop/test_to_gguf.py`` decodes every tensor).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

MODEL = "smollm2-135m"


def measure(fmt: str, method: str, calibration: int, text: Path, chunks: int, work: Path) -> dict:
    """Quantize SmolLM2 (``fmt`` None: the float model, measured through its shipped GGUF), export it to GGUF
    with the shipped file's metadata and tokenizer, and measure both perplexities on the same token ids."""
    import gguf
    import torch

    import numcast
    from numcast.evaluate.text import chunked_perplexity
    from numcast.interop import llama_cpp
    from numcast.pipeline.runner import quantize_blockwise
    from numcast.workloads import load_workload

    w = load_workload(MODEL)
    t_quantize = t_export = 0.0
    if fmt is None:
        path = w.source  # the shipped GGUF (Q4_1), which the float model de-quantizes exactly
    else:
        recipe = numcast.Recipe(weights=fmt, method=method, calibration=calibration)
        t0 = time.perf_counter()
        if recipe.reads_calibration:
            res = quantize_blockwise(w.model, w.blocks(w.model), w.calibration(calibration), recipe, progress=False)
        else:
            res = numcast.quantize_model(w.model, recipe)
        t_quantize = time.perf_counter() - t0
        t0 = time.perf_counter()
        path = numcast.export(res, "gguf", work / f"{MODEL}__{fmt}__{method}.gguf", overwrite=True,
                              tokenizer=w.tokenizer, gguf_file=w.source).path  # fmt: skip
        t_export = time.perf_counter() - t0
    ids = llama_cpp.tokenize(path, text)
    add_bos = bool(gguf.GGUFReader(str(path)).fields["tokenizer.ggml.add_bos_token"].contents())
    with torch.no_grad():
        ours = chunked_perplexity(w.model, ids, 512, chunks, w.tokenizer.bos_token_id if add_bos else None)
    t0 = time.perf_counter()
    theirs = llama_cpp.perplexity(path, text, 512, chunks)
    row = {"format": fmt or "float (shipped Q4_1)", "method": method, "numcast_ppl": ours, "llama_cpp_ppl": theirs,
           "gap": theirs / ours - 1, "gguf_bytes": path.stat().st_size, "quantize_s": t_quantize,
           "export_s": t_export, "llama_cpp_s": time.perf_counter() - t0}  # fmt: skip
    print(f"{row['format']:10s} {method:16s} numcast {ours:8.3f}  llama.cpp {theirs:8.3f}  gap {row['gap']:+.2%}",
          flush=True)  # fmt: skip
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", nargs="+", default=["mxfp4", "nvfp4", "gguf_q4_0"])
    ap.add_argument("--methods", nargs="+", default=["rtn", "gptq", "error-diffusion"])
    ap.add_argument("--calibration", type=int, default=8, help="calibration windows of 512 tokens")
    ap.add_argument("--chunks", type=int, default=8, help="evaluation windows of 512 tokens")
    ap.add_argument("--work", type=Path, default=Path("out/bench-gguf"))
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/gguf_perplexity.json"))
    ap.add_argument("--update", action="store_true", help="keep the other rows of an existing --json")
    args = ap.parse_args()
    from numcast.evaluate.text import wiki_split

    args.work.mkdir(parents=True, exist_ok=True)
    text = args.work / "eval.txt"
    text.write_text("\n\n".join(wiki_split()[1]))  # the evaluation articles, never seen in calibration
    cells = [(None, "-")] + [(f, m) for m in args.methods for f in args.formats]  # every format per method first
    rows: list[dict] = []
    for fmt, method in cells:  # the JSON is rewritten after each cell, so a stopped run keeps what it measured
        rows.append(measure(fmt, method, args.calibration, text, args.chunks, args.work))
        write_json(args, rows)
    print("\n| format | method | numcast ppl | llama.cpp ppl | gap |\n|---|---|---|---|---|")
    for r in json.loads(args.json.read_text())["rows"]:
        ppl = f"{r['numcast_ppl']:.3f} | {r['llama_cpp_ppl']:.3f}"
        print(f"| {r['format']} | {r['method']} | {ppl} | {r['gap']:+.2%} |")


def write_json(args, rows: list[dict]) -> None:
    """The record of ``rows`` (with ``--update``, beside the other rows already in ``--json``)."""
    from numcast.report.records import json_text

    if args.update and args.json.is_file():  # the cells run here replace theirs, the others stay
        done = {(r["format"], r["method"]) for r in rows}
        rows = [r for r in json.loads(args.json.read_text())["rows"] if (r["format"], r["method"]) not in done] + rows
    record = {"model": MODEL, "chunks": args.chunks, "n_ctx": 512, "calibration": args.calibration,
              "largest_abs_gap": max(abs(r["gap"]) for r in rows), "rows": rows}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json_text(record))


if __name__ == "__main__":
    main()
