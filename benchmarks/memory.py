"""Memory of the quantize phase against depth: synthetic Llama-architecture checkpoints with random weights
(hidden 1024, intermediate 2816, 16 heads, vocabulary 4096, float32 safetensors written to ``--work``) with 8,
16 and 32 layers, quantized to MXFP4 by GPTQ and Error Diffusion on the same calibration windows, with the
layers in memory and with ``offload="disk"`` (:mod:`numcast.pipeline.offload`).

    .venv/bin/python benchmarks/memory.py [--depths 8 16 32] [--methods gptq error-diffusion]
        [--calibration 8] [--allocators numcast glibc-default] [--json benchmarks/results/memory.json]

Each cell runs in its own process (``--cell``), which loads the model, then measures the peak resident memory
of the quantize phase alone (the kernel's high-water mark reset when it starts: :class:`PhasePeaks`).
``peak_rss_growth_8_to_32_layers`` is (peak at 32 layers − peak at 8) / peak at 8 per method and mode; the
in-memory bound is 1.5 × the stored checkpoint + one block's calibration activations of both streams (X and
X̂, float32, all windows), and the record states both terms. The bound is compared with the peak above the
process (``peak_above_process_mb``: the peak minus the cell's resident memory with Python, torch and
transformers imported, before the model is loaded), since a few hundred MiB of interpreter and libraries are
there whatever the model. ``--allocators numcast glibc-default`` runs every cell twice, the second time without
the runner's allocator settings (:func:`~numcast.pipeline.offload.return_freed_memory`,
:func:`~numcast.pipeline.offload.trim_heap`): the A/B of their memory and their time, side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HIDDEN, INTERMEDIATE, HEADS, VOCAB, SEQ = 1024, 2816, 16, 4096, 512


def make_checkpoint(folder: Path, layers: int) -> Path:
    """A random-weight Llama checkpoint (seeded by depth; the global RNG untouched), written once."""
    import torch
    import transformers as tf

    if (folder / "model.safetensors").is_file():
        return folder
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                            num_hidden_layers=layers, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                            max_position_embeddings=2 * SEQ, tie_word_embeddings=False)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(layers)
        model = tf.LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="100GB")
    return folder


def run_cell(folder: Path, method: str, offload: str, calibration: int, allocator: str = "numcast") -> dict:
    """One cell, in this process: load, then quantize under a fresh memory high-water mark. ``allocator``
    ``glibc-default``: the runner's allocator settings are switched off (no ``return_freed_memory``, no
    ``trim_heap``: glibc's dynamic mmap threshold and its own trimming), for the A/B of their cost and effect."""
    import torch

    if allocator == "glibc-default":
        import numcast.pipeline.offload as offload_module
        import numcast.pipeline.runner as runner_module

        for module in (offload_module, runner_module):
            module.return_freed_memory = module.trim_heap = lambda: False
    from transformers import AutoModelForCausalLM

    from numcast.models.hf_local import load_offloaded
    from numcast.pipeline.block_inputs import Placement
    from numcast.pipeline.offload import disk_offload_of
    from numcast.pipeline.recipe import Recipe
    from numcast.pipeline.runner import quantize_blockwise
    from numcast.report.records import PhasePeaks, peak_rss_mb, rss_mb

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    process_mb = rss_mb()  # Python, torch and transformers imported, no model yet
    mem = PhasePeaks()
    with mem.phase("load"):
        if offload == "disk":  # as numcast loads a local folder (these carry no tokenizer)
            model = load_offloaded(folder, torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (calibration, SEQ), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids[i : i + 2], "use_cache": False} for i in range(0, calibration, 2)]
    recipe = Recipe(weights="mxfp4", method=method, calibration=calibration)
    rss_before = peak_rss_mb()
    t0 = time.perf_counter()
    with mem.phase("quantize"):
        quantize_blockwise(model, list(model.model.layers), batches, recipe, progress=False,
                           placement=Placement(disk=disk_offload_of(model)))  # fmt: skip
    stored = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return {"layers": model.config.num_hidden_layers, "method": method, "offload": offload, "allocator": allocator,
            "peak_rss_quantize_mb": mem.peaks["quantize"], "rss_at_quantize_start_mb": rss_before,
            "process_before_load_mb": process_mb,
            "peak_above_process_mb": mem.peaks["quantize"] - process_mb,
            "peak_rss_load_mb": mem.peaks["load"], "exact_phase_peaks": mem.exact,
            "quantize_s": time.perf_counter() - t0, "stored_mb": stored / 2**20,
            "activations_both_streams_mb": 2 * calibration * SEQ * HIDDEN * 4 / 2**20}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depths", nargs="+", type=int, default=[8, 16, 32])
    ap.add_argument("--methods", nargs="+", default=["gptq", "error-diffusion"])
    ap.add_argument("--offloads", nargs="+", default=["none", "disk"])
    ap.add_argument("--calibration", type=int, default=8, help="calibration windows of 512 tokens")
    ap.add_argument("--work", type=Path, default=Path("out/bench-memory"))
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/memory.json"))
    ap.add_argument("--allocators", nargs="+", default=["numcast"], choices=["numcast", "glibc-default"],
                    help="glibc-default: without the runner's allocator settings (A/B; growth and bound use numcast)")
    ap.add_argument("--cell", nargs=4, metavar=("FOLDER", "METHOD", "OFFLOAD", "ALLOCATOR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cell:
        print(json.dumps(run_cell(Path(args.cell[0]), *args.cell[1:3], args.calibration, args.cell[3])))
        return
    rows = []
    for depth in args.depths:
        folder = make_checkpoint(args.work / f"llama-h{HIDDEN}-l{depth}", depth)
        for method in args.methods:
            for offload in args.offloads:
                for allocator in args.allocators:
                    cmd = [sys.executable, __file__, "--cell", str(folder), method, offload, allocator,
                           "--calibration", str(args.calibration)]  # fmt: skip
                    proc = subprocess.run(cmd, capture_output=True, text=True,
                                          env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
                    if proc.returncode != 0:
                        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-1500:]}")
                    row = json.loads(proc.stdout.strip().splitlines()[-1])
                    rows.append(row)
                    print(f"L={depth:3d} {method:16s} offload={offload:5s} allocator={allocator:13s} quantize peak "
                          f"{row['peak_rss_quantize_mb']:8.0f} MiB  (stored {row['stored_mb']:.0f} MiB, "
                          f"{row['quantize_s']:.0f} s)", flush=True)  # fmt: skip
    main_rows = [r for r in rows if r["allocator"] == "numcast"]
    growth = {}
    for method in args.methods:
        for offload in args.offloads:
            by = {r["layers"]: r["peak_rss_quantize_mb"] for r in main_rows if r["method"] == method
                  and r["offload"] == offload}  # fmt: skip
            if min(args.depths) < max(args.depths) and min(args.depths) in by and max(args.depths) in by:
                lo, hi = by[min(args.depths)], by[max(args.depths)]
                growth[f"{method}/{offload}"] = (hi - lo) / lo
    bound = {f"{r['method']}/L{r['layers']}": {"peak_above_process_mb": r["peak_above_process_mb"],
             "bound_mb": 1.5 * r["stored_mb"] + r["activations_both_streams_mb"]}
             for r in main_rows if r["offload"] == "none"}  # fmt: skip
    for v in bound.values():
        v["within"] = v["peak_above_process_mb"] <= v["bound_mb"]
    ab = len(args.allocators) > 1
    print(f"\n| layers | method | offload |{' allocator |' * ab} stored (MiB) | quantize peak RSS (MiB) | above the "
          f"process (MiB) | in-memory bound (MiB) | quantize (s) |\n|---|---|---|{'---|' * ab}---|---|---|---|---|")
    for r in rows:
        limit = f"{1.5 * r['stored_mb'] + r['activations_both_streams_mb']:.0f}" if r["offload"] == "none" else ""
        alloc = f" {r['allocator']} |" if ab else ""
        print(f"| {r['layers']} | {r['method']} | {r['offload']} |{alloc} "
              f"{r['stored_mb']:.0f} | {r['peak_rss_quantize_mb']:.0f} | {r['peak_above_process_mb']:.0f} | {limit} | "
              f"{r['quantize_s']:.0f} |")  # fmt: skip
    if growth:
        print(f"\npeak_rss_growth_{min(args.depths)}_to_{max(args.depths)}_layers:",
              ", ".join(f"{k} {v:+.1%}" for k, v in growth.items()))  # fmt: skip
    record = {"hidden": HIDDEN, "intermediate": INTERMEDIATE, "vocab": VOCAB, "seq": SEQ,
              "calibration_windows": args.calibration, "format": "mxfp4", "rows": rows,
              f"peak_rss_growth_{min(args.depths)}_to_{max(args.depths)}_layers": growth,
              "in_memory_bound": bound}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
