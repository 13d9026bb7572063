"""Does a method that loses on perplexity move a causal LM further from its float model? Perplexity beside the
fidelity to float (next-token KL divergence and top-1 agreement) for RTN, GPTQ and Error Diffusion.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/lm_fidelity.py --model smollm2-135m|PATH.gguf --format mxfp4 \\
        [--methods rtn gptq error-diffusion] [--calibration 16] [--json OUT.json]

The model and its protocol are the CLI's (``numcast.workloads.load_workload``: the perplexity windows of
``benchmarks/ptq.py``'s rows, 8 × 512 evaluation tokens, calibration windows of 512 tokens), each method runs
as ``numcast quantize`` runs it (weight-only RTN without calibration, the others through the block-wise runner
with every default), on its own copy of the float model. For every evaluation token the quantized model's
next-token distribution Q is compared with the float model's P: KL(P ‖ Q) = Σ p·(log p − log q) in nats
(mean over tokens, float32 log-softmax over the whole vocabulary), and whether the two models' most likely
tokens agree. Perplexity measures the model against the text; KL measures it against the float model, which
is what RTN, GPTQ and Error Diffusion set out to reproduce: where the two rankings differ, the text rewards a
departure from float.

The KL here is exact (the reference model runs beside each quantized one); ``numcast quantize`` reports a lower
bound of it that needs no second model (``evaluate.text.lm_fidelity``: the float model's 64 most likely tokens per
position apart, the rest merged), printed beside it as "KL bound" to show how close the bound is.

Prints a Markdown table and writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from numcast.evaluate.text import lm_fidelity, token_windows, wiki_split
from numcast.pipeline.data_free import quantize_data_free
from numcast.pipeline.recipe import Recipe
from numcast.pipeline.runner import quantize_blockwise
from numcast.workloads import load_workload


@torch.no_grad()
def compare(model, reference, windows: torch.Tensor) -> dict[str, float]:
    """Perplexity of ``model`` on ``windows`` [n, T] (the workloads' ``perplexity``: first token not predicted)
    and its mean next-token KL(reference ‖ model) and top-1 agreement with ``reference``, window by window."""
    nll, kl, agree, count = 0.0, 0.0, 0, 0
    for i in range(windows.shape[0]):
        x = windows[i : i + 1]
        logq = F.log_softmax(model(input_ids=x).logits.float()[0, :-1], dim=-1)
        logp = F.log_softmax(reference(input_ids=x).logits.float()[0, :-1], dim=-1)
        nll -= float(logq.gather(1, x[0, 1:, None]).sum(dtype=torch.float64))
        kl += float((logp.exp() * (logp - logq)).sum(dtype=torch.float64))
        agree += int((logq.argmax(-1) == logp.argmax(-1)).sum())
        count += x.shape[1] - 1
    return {"perplexity": math.exp(nll / count), "kl_divergence": kl / count, "top1_agreement": agree / count}


def _last_block_and_logprobs(model, last_block, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The last block's output (its first tensor) and the next-token log-probabilities of ``model`` on ``batch``."""
    got = []
    handle = last_block.register_forward_hook(lambda m, i, out: got.append(out[0] if isinstance(out, tuple) else out))
    try:
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits.float()
    finally:
        handle.remove()
    return got[0].float(), F.log_softmax(logits[:, :-1], dim=-1)


@torch.no_grad()
def guard_view(model, last_block, reference, reference_last_block, batch: dict) -> dict[str, float]:
    """What Error Diffusion's RTN guard compares (``runner.RTNGuard``: Σ squared error of the last block's output
    against the float model's over a guard batch of calibration windows) beside the next-token KL on the same
    windows: do the two measures rank the models alike?"""
    h, logq = _last_block_and_logprobs(model, last_block, batch)
    h_ref, logp = _last_block_and_logprobs(reference, reference_last_block, batch)
    sse = float((h - h_ref).square().sum(dtype=torch.float64))
    kl = float((logp.exp() * (logp - logq)).sum(dtype=torch.float64)) / logp[..., 0].numel()
    return {"guard_block_sse": sse, "guard_kl_divergence": kl}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a shipped causal LM (smollm2-135m) or a .gguf / HF folder path")
    p.add_argument("--format", required=True)
    p.add_argument("--methods", nargs="+", default=["rtn", "gptq", "error-diffusion"])
    p.add_argument("--calibration", type=int, default=16)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    w = load_workload(a.model)
    if w.primary != "perplexity":
        raise SystemExit(f"{a.model}: not a causal LM (its primary metric is {w.primary})")
    windows = token_windows(w.tokenizer, wiki_split()[1], 8, 512)
    reference = w.model.eval()
    ref_last = w.blocks(reference)[-1]
    batches = w.calibration(a.calibration)
    guard = batches[min(7, len(batches) - 1)]  # RTNGuard's first guard batch: every 8th (the last if fewer)
    bounded = lm_fidelity(reference, windows)[1]  # what numcast quantize keeps of the float model

    def measure(model, last_block) -> dict[str, float]:
        bound = lm_fidelity(model, windows, bounded)[0]["kl_divergence"]
        return {**compare(model, reference, windows), "kl_bound": bound,
                **guard_view(model, last_block, reference, ref_last, guard)}  # fmt: skip

    rows = [{"method": "float", **measure(reference, ref_last), "quantize_s": 0.0}]
    for method in a.methods:
        recipe = Recipe(weights=a.format, method=method, calibration=a.calibration)
        model = copy.deepcopy(reference)
        t0 = time.perf_counter()
        if recipe.reads_calibration:
            quantize_blockwise(model, w.blocks(model), batches, recipe, progress=False,
                               first_block_input=w.first_block_input)  # fmt: skip
        else:
            quantize_data_free(model, recipe, inplace=True)
        seconds = time.perf_counter() - t0
        rows.append({"method": method, **measure(model, w.blocks(model)[-1]), "quantize_s": seconds})
        print(f"{method}: {rows[-1]}", flush=True)
        del model
    for r in rows:
        r.update(model=w.name, format=a.format, calibration=a.calibration)
    print(f"\n{w.name}, {a.format}, {a.calibration} calibration windows of 512 tokens; 8 x 512 evaluation tokens\n")
    print("| method | perplexity | KL to float (nats/token) | KL bound | top-1 agreement | guard batch: last block SSE "
          "| guard batch: KL | quantize s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['perplexity']:.2f} | {r['kl_divergence']:.4f} | {r['kl_bound']:.4f} "
              f"| {r['top1_agreement']:.4f} | {r['guard_block_sse']:.4g} | {r['guard_kl_divergence']:.4f} "
              f"| {r['quantize_s']:.0f} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows}, indent=2) + "\n")
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
