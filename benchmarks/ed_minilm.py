"""Why Error Diffusion (and GPTQ) lose to RTN on MiniLM: the experiment behind the README's reading.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/ed_minilm.py [--formats mxfp4] [--json OUT.json]

MiniLM's shipped protocol calibrates on 48-word passages and evaluates mostly single words (the WordSim words
plus the 50 Lee documents), so the first reading was a calibration/evaluation mismatch. Each row is one
quantization of all-MiniLM-L6-v2 with the embedding cosine to float split over the
words and the documents:

- ``calibration``: ``passages`` (the protocol: 48-word chunks) or ``mixed`` (chunks of 1, 2, 4, ..., 48 words in
  turn, batched by length: calibration that covers the lengths the encoder is used on); ``samples``: how many
  (128, the protocol's; 512 passages or 1,024 mixed chunks ask whether more tokens help: 128 mixed chunks hold
  3,087 real tokens against 128 passages' 8,725, 1,024 mixed chunks 24,682);
- ``rtn for``: layers whose Error Diffusion solution is replaced by RTN (by name fragment), to find where the
  loss comes from; ``guard``: Error Diffusion's RTN guard (``rtn_guard``) on or off.

Prints a Markdown table and writes the rows as JSON. ``--tokens`` only counts each calibration set's rows (real
tokens and padding, batches of 16 padded to their longest) into ``benchmarks/results/ed_minilm_tokens.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from numcast.algorithms.rtn import rtn
from numcast.evaluate.text import wiki_split
from numcast.models.data import lee_corpus, wordsim353
from numcast.models.minilm import embed, load_minilm, minilm_blocks, tokenize
from numcast.pipeline import methods
from numcast.pipeline.data_free import quantize_data_free
from numcast.pipeline.recipe import Recipe
from numcast.pipeline.runner import quantize_blockwise

BATCH, LENGTHS = 16, (1, 2, 4, 8, 16, 32, 48)
# (method, calibration, samples, rtn for, guard)
CASES = [
    ("rtn", "passages", 128, (), False),
    ("gptq", "passages", 128, (), False),
    ("gptq", "mixed", 128, (), False),
    ("error-diffusion", "passages", 128, (), False),
    ("error-diffusion", "mixed", 128, (), False),
    ("error-diffusion", "passages", 128, ("attention.self.query", "attention.self.key"), False),
    ("error-diffusion", "passages", 128, ("intermediate", "output.dense"), False),
    ("error-diffusion", "passages", 128, (), True),
    ("gptq", "passages", 512, (), False),
    ("error-diffusion", "passages", 512, (), False),
    ("error-diffusion", "mixed", 1024, (), False),
]


def calibration(tok, kind: str, samples: int) -> list[dict]:
    words = " ".join(wiki_split()[0]).split()
    if kind == "passages":
        chunks = [" ".join(words[i : i + 48]) for i in range(0, 48 * samples, 48)]
    else:
        chunks, pos = [], 0
        for k in range(samples):
            n = LENGTHS[k % len(LENGTHS)]
            chunks.append(" ".join(words[pos : pos + n]))
            pos += n
        chunks.sort(key=lambda c: len(c.split()))  # batches of one length: no padding rows
    return [tokenize(tok, chunks[i : i + BATCH]) for i in range(0, len(chunks), BATCH)]


def run(model, tok, fmt: str, method: str, kind: str, samples: int, rtn_for: tuple[str, ...], guard: bool) -> float:
    recipe = Recipe(weights=fmt, method=method, calibration=samples, error_diffusion={"rtn_guard": guard})
    if method == "rtn":
        quantize_data_free(model, recipe, inplace=True)
        return 0.0
    original = methods.ErrorDiffusion.solve

    def solve(self, plan, stats):
        if any(part in plan.name for part in rtn_for):
            return rtn(plan.module.weight, plan.weight_format)
        return original(self, plan, stats)

    methods.ErrorDiffusion.solve = solve
    try:
        t0 = time.perf_counter()
        quantize_blockwise(model, minilm_blocks(model), calibration(tok, kind, samples), recipe, progress=False)
        return time.perf_counter() - t0
    finally:
        methods.ErrorDiffusion.solve = original


def count_tokens(tok, out: Path) -> None:
    """Rows of each calibration set of :data:`CASES`: real tokens, and padding (all rows − real)."""
    rows = []
    for kind, samples in sorted({(kind, samples) for _, kind, samples, _, _ in CASES}):
        masks = [b["attention_mask"] for b in calibration(tok, kind, samples)]
        real, total = sum(int(m.sum()) for m in masks), sum(m.numel() for m in masks)
        rows.append({"calibration": kind, "samples": samples, "real_tokens": real, "rows": total,
                     "padding_fraction": 1 - real / total})  # fmt: skip
    out.write_text(json.dumps({"rows": rows}, indent=2))
    print("| calibration | samples | real tokens | rows (with padding) | padding |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['calibration']} | {r['samples']} | {r['real_tokens']} | {r['rows']} | "
              f"{100 * r['padding_fraction']:.0f} % |")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", nargs="+", default=["mxfp4"])
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/ed_minilm.json"))
    p.add_argument("--tokens", action="store_true", help="only count the calibration sets' tokens and padding")
    args = p.parse_args()
    torch.set_num_threads(2)
    float_model, tok = load_minilm()
    if args.tokens:
        count_tokens(tok, Path("benchmarks/results/ed_minilm_tokens.json"))
        return
    pairs = wordsim353()
    words = sorted({w for a, b, _ in pairs for w in (a, b)})
    docs, _ = lee_corpus()
    ref_w, ref_d = embed(float_model, tok, words), embed(float_model, tok, docs)
    rows = []
    for fmt in args.formats:
        for method, kind, samples, rtn_for, guard in CASES:
            model = copy.deepcopy(float_model)
            seconds = run(model, tok, fmt, method, kind, samples, rtn_for, guard)
            cw, cd = (embed(model, tok, words) * ref_w).sum(1), (embed(model, tok, docs) * ref_d).sum(1)
            rows.append({"format": fmt, "method": method, "calibration": kind, "samples": samples,
                         "rtn_for": list(rtn_for), "rtn_guard": guard,
                         "embedding_cosine": float(torch.cat([cw, cd]).mean()),
                         "cosine_words": float(cw.mean()), "cosine_documents": float(cd.mean()),
                         "quantize_s": seconds})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    args.json.write_text(json.dumps({"rows": rows}, indent=2))
    print("| format | method | calibration | samples | RTN for | guard | cosine | words | documents |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['format']} | {r['method']} | {r['calibration']} | {r['samples']} | "
              f"{', '.join(r['rtn_for']) or '-'} | {'on' if r['rtn_guard'] else 'off'} | "
              f"{r['embedding_cosine']:.4f} | {r['cosine_words']:.4f} | {r['cosine_documents']:.4f} |")  # fmt: skip


if __name__ == "__main__":
    main()
