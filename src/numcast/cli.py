"""numcast command line: ``numcast formats | cast | demo``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

from numcast.formats.ops import cast_stats, quantize
from numcast.formats.registry import get_format, list_formats
from numcast.formats.spec import ROUNDINGS
from numcast.io import MARKER, write_atomic
from numcast.pipeline.methods import METHODS
from numcast.report.records import json_text
from numcast.report.tables import (
    STATS_COLUMNS,
    formats_markdown,
    formats_table,
    make_table,
    markdown_table,
    print_table,
    stats_row,
)

console = Console(width=200)


def _load_tensors(path: Path, key: str | None) -> dict[str, torch.Tensor]:
    """Floating tensors of a .pt, .npy or .safetensors file (``key`` picks one); errors name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".safetensors", ".pt", ".pth", ".bin"):
        raise ValueError(f"{path}: unsupported input type {suffix!r}; use .pt, .npy or .safetensors")
    try:
        if suffix == ".npy":
            import numpy as np

            obj = {"array": torch.from_numpy(np.load(path, allow_pickle=False))}
        elif suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - each reader raises its own types for a damaged or foreign file
        raise ValueError(f"{path}: not a readable {suffix} tensor file ({type(exc).__name__}: {exc})") from exc
    if isinstance(obj, torch.Tensor):
        obj = {"tensor": obj}
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}; numcast casts a tensor or a dict of named tensors")
    tensors = obj
    if key is not None:
        if key not in tensors:
            raise KeyError(f"{path}: no tensor named {key!r}; it has {', '.join(map(str, list(tensors)[:20]))}")
        tensors = {key: tensors[key]}
    floats = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    if not floats:
        raise ValueError(f"{path}: no floating-point tensor to cast")
    return floats


def cmd_formats(args: argparse.Namespace) -> int:
    fmts = list_formats()
    if args.json:
        print(json_text([f.figures() for f in fmts]))
    elif args.markdown:
        print(formats_markdown(fmts))
    else:
        print_table(formats_table(fmts), console)
    return 0


def cmd_cast(args: argparse.Namespace) -> int:
    fmt = get_format(args.format)
    tensors = _load_tensors(Path(args.input), args.key)
    if args.out:
        out = Path(args.out)
        if out.is_dir():
            raise IsADirectoryError(f"--out {out} is a directory; give the name of the .safetensors file to write")
        if not out.parent.is_dir():
            raise FileNotFoundError(f"--out {out}: the directory {out.parent} does not exist")
        if out.exists() and not args.overwrite:
            raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
        if len(tensors) != 1:
            raise ValueError(f"--out writes one tensor and {args.input} has {len(tensors)}; pick one with --key")
    rows, records = [], []
    for name, x in tensors.items():
        _, s = cast_stats(x, fmt, rounding=args.rounding, seed=args.seed)
        qt = quantize(x, fmt, rounding=args.rounding, seed=args.seed)
        s.update(tensor=name, shape=list(x.shape), bits_per_value=qt.bits_per_value, packed_bytes=qt.nbytes)
        records.append(s)
        rows.append([name] + stats_row(s)[1:])
        if args.out:
            qt.save(args.out, overwrite=args.overwrite)
    if args.json:
        print(json_text(records))
    else:
        print_table(
            make_table(f"cast to {fmt.label} ({args.rounding or fmt.rounding})", ("tensor",) + STATS_COLUMNS[1:], rows),
            console,
        )
        if args.out:
            console.print(f"wrote {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on the embedded default: every format; a real weight matrix cast to every block format
    (MobileNetV2 ImageNet classifier, [1000, 1280], shipped in a wheel); then a real model quantized with
    GPTQ and measured (default: MiniLM-L6 to NVFP4, report in ``out/demo``, numcast's own output)."""
    from numcast.models.assets import mobilenet_v2_state_dict

    print_table(formats_table(list_formats()), console)
    sd = mobilenet_v2_state_dict()
    w = sd[args.tensor]
    w2 = w.reshape(w.shape[0], -1)  # conv weights as [O, C_in*kh*kw]: blocks along the reduction axis
    fmts = [f for f in list_formats() if f.scaling.granularity in ("block", "channel")]
    rows, records = [], []
    for f in fmts:
        t0 = time.perf_counter()
        _, s = cast_stats(w2, f)
        dt = time.perf_counter() - t0
        qt = quantize(w2, f)
        s.update(bits_per_value=qt.bits_per_value, packed_bytes=qt.nbytes, cast_ms=1e3 * dt)
        records.append(s)
        rows.append(stats_row(s) + [s["cast_ms"]])
    title = (
        f"MobileNetV2 (ImageNet) {args.tensor} {list(w2.shape)}: {w2.numel()} float32 values, {4 * w2.numel()} bytes"
    )
    print_table(make_table(title, STATS_COLUMNS + ("cast ms",), rows), console)
    if args.markdown:
        print(markdown_table(STATS_COLUMNS, [r[:-1] for r in rows]))
    if args.json_out:
        write_atomic(args.json_out, lambda tmp: tmp.write_text(json_text(records)))
    if args.model:
        from numcast.jobs import run_ptq
        from numcast.pipeline.recipe import Recipe

        recipe = Recipe(weights=args.weights, method="gptq", calibration=args.calibration)
        out = Path(args.out)
        console.print(
            f"\nquantizing {args.model} to {recipe.weights} with GPTQ ({recipe.calibration} calibration samples)"
        )
        with console.status("starting") as status:
            own = (out / MARKER).is_file() and (out / "report.json").is_file()  # an earlier demo's (or run's) output
            rec = run_ptq(args.model, recipe, out, overwrite=args.overwrite or own, progress=False,
                          stage=lambda t: status.update(t))  # fmt: skip
        print_ptq(rec, recipe, str(out))
    return 0


RECIPE_FLAGS = ("weights", "activations", "activation_mode", "activation_observer", "method", "calibration",
                "include", "exclude", "quantize_embeddings", "quantize_lm_head")  # fmt: skip


# recipe section -> {field: argparse dest}
SECTION_FLAGS = {
    "gptq": {"damp": "gptq_damp", "block_size": "gptq_block_size", "act_order": "gptq_act_order"},
    "error_diffusion": {"scale_rule": "ed_scale_rule", "order": "ed_order",
                        "calibrate_float_layers": "ed_calibrate_float_layers", "rtn_guard": "ed_rtn_guard",
                        "damp": "ed_damp"},
    "attention_round": {k: f"ar_{k}" for k in ("objective", "iterations", "variant", "time_budget_s", "k_nearest",
                                               "batch_size")},
    "mixed_precision": {"strategy": "mixed_precision", "candidates": "candidates", "budget": "budget"},
    "accumulator": {k: f"accumulator_{k}" for k in ("bits", "rule", "rounding", "input_sign")},
}  # fmt: skip


def recipe_from_args(args: argparse.Namespace):
    """The recipe file (if any) with every flag given on the command line applied on top (flags = fields)."""
    from numcast.pipeline.recipe import Recipe

    data = Recipe.load(args.recipe).model_dump() if args.recipe else {}
    for k in RECIPE_FLAGS:
        v = getattr(args, k)
        if v is not None:
            data[k] = v
    for section, fields in SECTION_FLAGS.items():
        sub = dict(data.get(section) or {})
        for field, dest in fields.items():
            v = getattr(args, dest)
            if v is not None:
                sub[field] = v
        data[section] = sub
    if "weights" not in data:
        raise ValueError("no weight format: pass --weights FMT or a --recipe with `weights`")
    return Recipe.model_validate(data)


def _metric_rows(float_m: dict | None, quant_m: dict) -> list[list]:
    return [[k, (float_m or {}).get(k), v] for k, v in quant_m.items()]


def cmd_quantize(args: argparse.Namespace) -> int:
    from numcast.jobs import run_ptq
    from numcast.pipeline.distributed import init_from_env

    init_from_env()  # under torchrun: one process group (gloo on CPU, NCCL on CUDA), rank 0 writes
    recipe = recipe_from_args(args)
    with console.status("starting") as status:
        rec = run_ptq(args.model, recipe, Path(args.out), overwrite=args.overwrite, progress=not args.no_progress,
                      stage=lambda t: status.update(t), calibration_data=args.calibration_data,
                      eval_data=args.eval_data, dtype=args.dtype, sqnr_samples=args.sqnr_samples,
                      offload=args.offload)  # fmt: skip
    if args.json:
        print(json_text({k: v for k, v in rec.items() if k != "layers"}))
        return 0
    print_ptq(rec, recipe, args.out)
    return 0


def print_ptq(rec: dict, recipe, out: str) -> None:
    """The quantize command's table: float vs quantized metrics, size, bits, time, memory."""
    m = rec["metrics"]
    title = f"{rec['model']}: {recipe.weights} weights" + (
        f", {recipe.activations} activations" if recipe.activations else ""
    )
    rows = _metric_rows(m["float"], m["quantized"])
    rows += [["size (bytes)", rec["size_bytes"]["float"], rec["size_bytes"]["packed"]],
             ["bits per quantized parameter", 32.0, rec["bits_per_param"]],
             ["wall time (s)", None, rec["wall_time_s"]["total"]],
             ["peak memory (MiB)", None, rec["peak_rss_mb"]],
             ["peak memory while quantizing (MiB)", None, rec["peak_rss_mb_by_phase"]["quantize"]]]  # fmt: skip
    print_table(make_table(f"{title}, {recipe.method}", ("metric", "float", "quantized"), rows), console)
    q = [r for r in rec["layers"] if r["action"] == "quantized"]
    console.print(f"{len(q)} layers quantized, {len(rec['layers']) - len(q)} kept in float (reasons in report.json)")
    for n in rec["notes"]:
        console.print(f"[yellow]note:[/yellow] {n}")
    files = [f for f in ("report.json", "sqnr.png", "model.safetensors", "recipe.yaml") if (Path(out) / f).exists()]
    console.print(f"wrote {out}/" + ", ".join(files))
    if not any(r.get("sqnr_db") is not None for r in q):
        console.print("no per-layer SQNR: weight-only RTN/EP-init runs without a calibration pass "
                      "(--sqnr-samples N measures it on N samples)")  # fmt: skip


def cmd_evaluate(args: argparse.Namespace) -> int:
    from numcast.jobs import run_evaluate

    with console.status("starting") as status:
        res = run_evaluate(Path(args.dir), stage=lambda t: status.update(t), eval_data=args.eval_data,
                           lm_eval_tasks=args.lm_eval, lm_eval_include=args.lm_eval_include,
                           lm_eval_limit=args.lm_eval_limit)  # fmt: skip
    if args.json:
        print(json_text(res))
        return 0 if res["stored"] is None or res["same"] else 1
    for task, q in (res.get("lm_eval") or {}).get("quantized", {}).items():
        f = res["lm_eval"]["float"].get(task, {})
        print_table(make_table(f"lm-eval {task}", ("metric", "float", "quantized"),
                               [[k, f.get(k), v] for k, v in q.items()]), console)  # fmt: skip
    rows = _metric_rows(res["stored"], res["measured"])
    print_table(make_table(f"{res['model']} reloaded from {args.dir}", ("metric", "at quantization", "reloaded"),
                           rows), console)  # fmt: skip
    if res["stored"] is None:
        console.print("[yellow]nothing to compare with: no report.json beside the model, or it was measured on "
                      "other evaluation data[/yellow]")
        return 0
    if res["same"]:
        console.print("reload is bit-exact: identical metrics")
        return 0
    console.print("[red]error: the reloaded model's metrics differ from report.json[/red]")
    return 1


def cmd_export(args: argparse.Namespace) -> int:
    from numcast.jobs import export

    with console.status("starting") as status:
        res = export(args.run, args.to, args.out, float_fallback=args.float_fallback, overwrite=args.overwrite,
                     gguf_file=args.gguf_metadata, stage=lambda t: status.update(t))  # fmt: skip
    if args.json:
        print(json_text(res.to_record()))
        return 0
    kinds = sorted({k for k in res.layers.values()})
    console.print(f"wrote {res.path} ({args.to}): {len(res.layers)} quantized layers as {', '.join(kinds)}",
                  highlight=False)  # fmt: skip
    for name, why in res.float_layers.items():
        console.print(f"[yellow]written unquantized:[/yellow] {name}: {why}", highlight=False)
    return 0


def cmd_accumulator(args: argparse.Namespace) -> int:
    from numcast.jobs import run_accumulator

    with console.status("starting") as status:
        rec = run_accumulator(args.target, args.input_bits, args.accumulator_bits, weights=args.weights,
                              samples=args.samples, mode=args.mode, out=Path(args.out) if args.out else None,
                              overwrite=args.overwrite, tile=args.tile, tile_bits=args.tile_bits,
                              stage=lambda t: status.update(t))  # fmt: skip
    if args.json:
        print(json_text(rec))
        return 0
    P = rec["accumulator_bits"]
    cols = ("layer", "K", "input", "exact", "A2Q+ rule", "A2Q rule", "data type", f"real overflows @P={P}",
            "dot products wrong", f"channels overflowing (worst case) @P={P}")  # fmt: skip
    rows = [[r["name"], r["K"], r["input"], r["exact_bits"], r["a2q_plus_bits"], r["a2q_bits"], r["datatype_bits"],
             r["overflows_real"], f"{r['dot_products_overflowing']}/{r['dot_products']}",
             f"{r['channels_overflowing_adversarial']}/{r['channels']}"] for r in rec["layers"]]  # fmt: skip
    print_table(make_table(f"{rec['source']}: accumulator bits needed per layer (max over channels)", cols, rows),
                console)  # fmt: skip
    if rec["tile"]:
        console.print(f"tiles of {rec['tile']} inputs in {rec['tile_bits']}-bit registers; bits each tile needs: "
                      + ", ".join(f"{r['name']} {r['tile_bits_needed']}" for r in rec["layers"]))  # fmt: skip
    bad = [r["name"] for r in rec["layers"] if r["channels_overflowing_adversarial"]]
    if bad:
        console.print(f"[red]{len(bad)} of {len(rec['layers'])} layers can overflow a {P}-bit accumulator[/red]")
    else:
        console.print(f"no layer can overflow a {P}-bit accumulator (worst-case inputs simulated)")
    for s in rec["skipped"]:
        console.print(f"[yellow]not analysed:[/yellow] {s['name']}: {s['reason']}")
    console.print("wrote " + ", ".join(rec["files"]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="numcast", description="Quantize tensors and networks to modern number formats.")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("formats", help="table of every registered format")
    f.add_argument("--json", action="store_true", help="print JSON instead of a table")
    f.add_argument("--markdown", action="store_true", help="print a Markdown table (the README's)")
    f.set_defaults(func=cmd_formats)
    c = sub.add_parser("cast", help="cast a tensor file to a format and print the error figures")
    c.add_argument("input", help=".pt, .npy or .safetensors file")
    c.add_argument("--format", "-f", required=True, help="format name (see `numcast formats`)")
    c.add_argument("--key", help="tensor name inside the file (default: every floating tensor)")
    c.add_argument("--rounding", choices=ROUNDINGS, default=None)
    c.add_argument("--seed", type=int, default=None, help="seed for stochastic rounding")
    c.add_argument("--out", help="write the packed QTensor (safetensors)")
    c.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    c.add_argument("--json", action="store_true", help="print JSON instead of a table")
    c.set_defaults(func=cmd_cast)
    d = sub.add_parser("demo", help="the main job on the shipped MobileNetV2 weights")
    d.add_argument("--tensor", default="classifier.1.weight", help="state-dict entry to cast")
    d.add_argument("--json-out", help="also write the records as JSON here")
    d.add_argument("--markdown", action="store_true", help="also print the error table as Markdown")
    d.add_argument("--model", default="minilm-l6", help="then quantize this model with GPTQ ('' to skip)")
    d.add_argument("--weights", default="nvfp4", help="weight format of that quantization")
    d.add_argument("--calibration", type=int, default=64, help="calibration samples of that quantization")
    d.add_argument("--out", default="out/demo", help="where that quantization writes its report")
    d.add_argument("--overwrite", action="store_true", help="replace an earlier numcast output in --out")
    d.set_defaults(func=cmd_demo)
    q = sub.add_parser("quantize", help="quantize a model, measure it, write report + packed model")
    q.add_argument("model", help="model name (minilm-l6, smollm2-135m, mobilenet-v2, efficientnet-lite0, fmnist-cnn) "
                   "or the path of a local Hugging Face model folder or .gguf file")
    q.add_argument("--weights", help="weight format (see `numcast formats`)")
    q.add_argument("--activations", help="activation (layer input) format")
    q.add_argument("--activation-mode", dest="activation_mode", choices=("dynamic", "static"))
    q.add_argument("--activation-observer", dest="activation_observer", choices=("minmax", "percentile", "mse"))
    q.add_argument("--method", choices=list(METHODS), help="weight solver (default rtn)")
    q.add_argument("--calibration", type=int, help="number of calibration samples")
    q.add_argument("--include", nargs="+", help="globs of module names to quantize (default: all)")
    q.add_argument("--exclude", nargs="+", help="globs of module names to keep in float")
    q.add_argument("--quantize-embeddings", dest="quantize_embeddings", action="store_true", default=None)
    q.add_argument("--quantize-lm-head", dest="quantize_lm_head", action="store_true", default=None)
    q.add_argument("--gptq-damp", dest="gptq_damp", type=float)
    q.add_argument("--gptq-block-size", dest="gptq_block_size", type=int)
    q.add_argument("--act-order", dest="gptq_act_order", action="store_true", default=None)
    q.add_argument("--ed-scale-rule", dest="ed_scale_rule", choices=("static", "dynamic"),
                   help="error-diffusion block scales: from the float weights (static, default) or updated targets")
    q.add_argument("--ed-order", dest="ed_order", choices=("strong-first", "weak-first", "natural", "auto"),
                   help="error-diffusion column order (default strong-first: largest input norm first)")
    q.add_argument("--ed-calibrate-float-layers", dest="ed_calibrate_float_layers", action="store_true", default=None,
                   help="error-diffusion: also re-fit layers kept in float inside the blocks (Q = identity)")
    q.add_argument("--ed-rtn-guard", dest="ed_rtn_guard", action=argparse.BooleanOptionalAction, default=None,
                   help="error-diffusion: give every solved layer its RTN weights when the RTN model's output is "
                        "closer to the float model's on every 8th calibration batch (default on)")
    q.add_argument("--ed-damp", dest="ed_damp", type=float,
                   help="error-diffusion: ridge toward the float weight, this fraction of the mean input energy "
                        "added to both Gram diagonals (default 0.01, as GPTQ's damping; 0: none, as in the paper)")
    q.add_argument("--mixed-precision", dest="mixed_precision", choices=("lcl", "sensitivity"),
                   help="per-layer weight formats from --candidates under --budget (lossy coding length or SQNR)")
    q.add_argument("--candidates", type=lambda t: [c.strip() for c in t.split(",") if c.strip()],
                   help="comma-separated candidate weight formats, e.g. int2_g64,int3_g64,int4_g128")
    q.add_argument("--budget", help="size budget: average bits per parameter (4.5bits) or bytes (250kB)")
    q.add_argument("--ar-objective", dest="ar_objective", choices=("block", "layer"),
                   help="attention-round: reconstruct each block's output (default) or each layer's alone")
    q.add_argument("--ar-iterations", dest="ar_iterations", type=int, help="attention-round: steps per block (500)")
    q.add_argument("--ar-levels", dest="ar_k_nearest", type=int,
                   help="attention-round: levels each weight attends to (default: the whole grid up to 16 levels, "
                   "else the 8 nearest)")  # fmt: skip
    q.add_argument("--ar-variant", dest="ar_variant", choices=("soft", "sampled"),
                   help="attention-round: expectation (soft, default) or sampled levels in the forward")
    q.add_argument("--ar-time-budget", dest="ar_time_budget_s", type=float,
                   help="attention-round: at most this many seconds per block (or layer)")
    q.add_argument("--ar-batch-size", dest="ar_batch_size", type=int,
                   help="attention-round: calibration samples per step, drawn from all the samples (16)")
    q.add_argument("--accumulator-bits", dest="accumulator_bits", type=int,
                   help="accumulator width P no layer may overflow (A2Q/A2Q+ L1 budget on the integer weights; "
                        "needs integer weights per channel and integer --activations)")
    q.add_argument("--accumulator-rule", dest="accumulator_rule", choices=("a2q+", "a2q"),
                   help="the L1 budget of --accumulator-bits (default a2q+: zero-centred, twice A2Q's for uint inputs)")
    q.add_argument("--accumulator-rounding", dest="accumulator_rounding", choices=("budget", "toward_zero"),
                   help="rounding under the budget: to nearest where the budget allows (default) or toward zero")
    q.add_argument("--input-sign", dest="accumulator_input_sign", choices=("auto", "format"),
                   help="accumulator-aware: unsigned inputs where the calibration inputs are never negative (auto, "
                        "default) or the --activations format as given")
    q.add_argument("--calibration-data", dest="calibration_data",
                   help="your calibration data: .txt / .jsonl / folder of .txt (text models), an image folder "
                        "(image models), or .pt / .safetensors model inputs (any model)")
    q.add_argument("--eval-data", dest="eval_data", help="your evaluation data (the same kinds as --calibration-data)")
    q.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="load the model in this dtype (default auto: what its checkpoint stores; statistics stay "
                   "float64); Hugging Face models")  # fmt: skip
    q.add_argument("--offload", default="none", choices=("none", "disk", "auto"),
                   help="causal LMs: keep the layers on disk and read each when it is used (memory independent of "
                   "depth); auto: disk when the model would not fit in memory")  # fmt: skip
    q.add_argument("--sqnr-samples", dest="sqnr_samples", type=int, default=0,
                   help="weight-only RTN / EP-init run with no calibration pass; measure the per-layer output SQNR "
                   "on this many calibration samples (default 0: not measured)")  # fmt: skip
    q.add_argument("--recipe", help="recipe file (.yaml/.json); flags given here override its fields")
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument("--overwrite", action="store_true",
                   help="replace an earlier numcast output in --out (never a directory numcast did not write)")
    q.add_argument("--no-progress", action="store_true")
    q.add_argument("--json", action="store_true", help="print the report (without layers) as JSON")
    q.set_defaults(func=cmd_quantize)
    a = sub.add_parser("accumulator", help="accumulator bits each layer needs; overflows of a P-bit accumulator")
    a.add_argument("target", help="a directory written by `numcast quantize`, or a model name/path (RTN --weights)")
    a.add_argument("--input-bits", dest="input_bits", type=int, required=True,
                   help="input bits of layers without an integer input quantizer of their own")
    a.add_argument("--accumulator-bits", dest="accumulator_bits", type=int, required=True, help="accumulator width P")
    a.add_argument("--weights", default="int8_channel", help="weight format (RTN) when TARGET is a model name")
    a.add_argument("--samples", type=int, default=32, help="calibration samples whose real inputs are simulated")
    a.add_argument("--mode", choices=("wrap", "saturate"), default="wrap", help="accumulator overflow behaviour")
    a.add_argument("--tile", type=int, help="two-stage accumulation: tiles of this many inputs ...")
    a.add_argument("--tile-bits", dest="tile_bits", type=int, help="... each summed in a register of these bits")
    a.add_argument("--out", help="where accumulator.json/.png go (default: TARGET dir or out/accumulator-MODEL)")
    a.add_argument("--overwrite", action="store_true", help="replace existing accumulator.json/.png")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_accumulator)
    e = sub.add_parser("evaluate", help="reload a packed model bit-exactly and re-measure it")
    e.add_argument("dir", help="directory written by `numcast quantize`")
    e.add_argument("--eval-data", dest="eval_data", help="measure on your data instead (see `quantize --eval-data`)")
    e.add_argument("--lm-eval", dest="lm_eval", type=lambda t: [x.strip() for x in t.split(",") if x.strip()],
                   help="comma-separated lm-evaluation-harness tasks, run on the float and the quantized model")
    e.add_argument("--lm-eval-include", dest="lm_eval_include", help="a folder of lm-eval task YAMLs (local data)")
    e.add_argument("--lm-eval-limit", dest="lm_eval_limit", type=int, help="at most N documents per lm-eval task")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_evaluate)
    from numcast.interop.export import EXPORTERS

    x = sub.add_parser("export", help="write a quantized model for llama.cpp (GGUF), vLLM (compressed-tensors) or "
                       "FINN/hls4ml (QONNX), with numcast's own codes")  # fmt: skip
    x.add_argument("run", help="directory written by `numcast quantize`")
    x.add_argument("--to", required=True, choices=list(EXPORTERS),
                   help="; ".join(f"{e.name}: {e.description}" for e in EXPORTERS.values()))  # fmt: skip
    x.add_argument("--out", required=True, help="the file (gguf: .gguf, qonnx: .onnx) or folder (compressed-tensors)")
    x.add_argument("--float-fallback", dest="float_fallback", action="store_true",
                   help="write layers the target cannot store unquantized (listed) instead of failing")
    x.add_argument("--gguf-metadata", dest="gguf_metadata",
                   help="gguf: copy llama.cpp metadata and tokenizer from this GGUF of the same model")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output")
    x.add_argument("--json", action="store_true")
    x.set_defaults(func=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        console.print("interrupted: no output was written (partial outputs are removed)", highlight=False)
        return 130
    except (ValueError, TypeError, KeyError, OSError, RuntimeError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        console.print(f"[red]error:[/red] {msg}", highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
