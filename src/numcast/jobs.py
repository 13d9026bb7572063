"""The main job as a function: load a model workload, quantize it by recipe, measure, report, export."""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path

from numcast.accumulator.bounds import check_bits
from numcast.interop.export import export_model, get_exporter
from numcast.interop.source import ExportResult, ExportSource, quantized_layers
from numcast.io import OutputDir, write_atomic
from numcast.pipeline import distributed
from numcast.pipeline.block_inputs import Placement
from numcast.pipeline.data_free import quantize_data_free
from numcast.pipeline.export import MODEL_FILE, load_quantized, read_dtype, read_metadata, save_quantized
from numcast.pipeline.offload import disk_offload_of
from numcast.pipeline.recipe import Recipe
from numcast.pipeline.runner import quantize_blockwise
from numcast.report.plots import plot_accumulator, plot_sqnr
from numcast.report.records import PhasePeaks, json_safe, json_text, model_sizes, write_report
from numcast.workloads import load_workload


def run_ptq(model_name: str, recipe: Recipe, out: Path, *, overwrite: bool = False, progress: bool = True,
            stage=lambda text: None, calibration_data: str | None = None,
            eval_data: str | None = None, dtype: str = "auto", sqnr_samples: int = 0,
            offload: str = "none") -> dict:  # fmt: skip
    """Quantize ``model_name`` by ``recipe``; write report.json, sqnr.png, model.safetensors and recipe.yaml
    into ``out`` (atomically, :class:`numcast.io.OutputDir`: built beside it and renamed over it only when the
    run succeeded; ``overwrite`` replaces only an earlier numcast output); return the report record.
    ``calibration_data`` / ``eval_data``: paths of the user's data (:mod:`numcast.models.user_data`), recorded
    in the report's ``data``. ``dtype``: the dtype to load the model in (``auto``: the checkpoint's;
    :func:`numcast.workloads.load_workload`), recorded in the report and the packed file (reloads use it).

    A recipe that reads no calibration data (weight-only RTN / EP-init: ``Recipe.reads_calibration``) is
    quantized layer by layer with no calibration pass; the per-layer output SQNR then comes from the first
    ``sqnr_samples`` calibration samples through the block-wise runner (identical weights: the method ignores
    the data), or is not measured (0, the default). Other recipes calibrate on ``recipe.calibration`` samples
    and always report it."""
    if recipe.calibration < 1:
        raise ValueError("the calibration set is empty: pass --calibration N with N >= 1")
    if sqnr_samples < 0:
        raise ValueError(f"--sqnr-samples must be >= 0, got {sqnr_samples}")
    if sqnr_samples and recipe.reads_calibration:
        raise ValueError(f"--sqnr-samples does nothing with method {recipe.method!r} / static activations / mixed "
                         "precision: the per-layer SQNR is measured on every calibration sample already")  # fmt: skip
    main = distributed.is_main()  # torch.distributed: rank 0 measures and writes, the others take its record
    with distributed.fail_together():
        with OutputDir(out, overwrite) if main else nullcontext() as d:
            record = _run_ptq(model_name, recipe, d.tmp if main else None, progress and main, stage, calibration_data,
                              eval_data, dtype, sqnr_samples, offload)  # fmt: skip
        return distributed.broadcast_object(record, 0)  # once rank 0's outputs are in place


def _run_ptq(model_name: str, recipe: Recipe, tmp: Path | None, progress: bool, stage, calibration_data, eval_data,
             dtype: str, sqnr_samples: int, offload: str = "none") -> dict:  # fmt: skip
    mem = PhasePeaks()
    t_start = time.perf_counter()
    stage(f"loading {model_name}")
    with mem.phase("load"):
        w = load_workload(model_name, calibration_data, eval_data, dtype, offload)
    device = distributed.compute_device()  # torch.distributed on CUDA: this rank's GPU (untested: no GPU here)
    placement = Placement(device=device or "cpu", disk=disk_offload_of(w.model))
    if placement.disk is not None and recipe.make_method().refits_float_layers:
        raise ValueError("--ed-calibrate-float-layers re-fits float layers in memory; it does not run with the "
                         "layers offloaded to disk (--offload disk)")  # fmt: skip
    t_load = time.perf_counter() - t_start
    stage("measuring the float model")
    t0 = time.perf_counter()
    with mem.phase("evaluate_float"):
        float_metrics = _measure(w)
    t_eval_f = time.perf_counter() - t0
    samples = recipe.calibration if recipe.reads_calibration else min(sqnr_samples, recipe.calibration)
    if placement.disk is not None and not samples:  # layers on disk are quantized as the runner reaches them
        samples = 1
    t0 = time.perf_counter()
    with mem.phase("calibration"):
        if samples:
            stage(f"preparing {samples} calibration samples")
        batches = w.calibration(samples) if samples else []
    t_cal = time.perf_counter() - t0
    stage(f"quantizing with {recipe.method}")
    with mem.phase("quantize"):
        if batches:
            res = quantize_blockwise(w.model, w.blocks(w.model), batches, recipe, progress=progress,
                                     first_block_input=w.first_block_input, placement=placement)  # fmt: skip
        else:  # weight-only RTN / EP-init: layer by layer, no calibration pass
            t_q = time.perf_counter()
            res = quantize_data_free(w.model, recipe, inplace=True)
            res.wall_time_s = time.perf_counter() - t_q
    recipe = res.recipe or recipe  # as resolved (accumulator-aware recipes: per-layer input signs)
    stage("measuring the quantized model")
    t0 = time.perf_counter()
    with mem.phase("evaluate_quantized"):
        q_metrics = _measure(w)
    t_eval_q = time.perf_counter() - t0
    sizes = model_sizes(w.model)
    notes = [n for n in {w.notes(r.weight_format) for r in res.quantized} if n]
    layers = res.to_records()
    record = {
        "model": w.name,
        "description": w.description,
        "dtype": w.dtype,
        "offload": w.offload,
        "recipe": recipe.model_dump(mode="json"),
        "metrics": {"float": float_metrics, "quantized": q_metrics},
        "primary_metric": w.primary,
        "higher_is_better": w.higher_is_better,
        "size_bytes": {"float": sizes["float"], "packed": sizes["packed"]},
        "bits_per_param": sizes["bits_per_param"],
        "quantized_params": sizes["quantized_params"],
        "wall_time_s": {
            "load": t_load,
            "calibration": t_cal,
            "quantize": res.wall_time_s,
            "evaluate": t_eval_f + t_eval_q,
            "evaluate_float": t_eval_f,
            "total": time.perf_counter() - t_start,
        },  # fmt: skip
        "peak_rss_mb": None,  # filled after the export
        "peak_rss_mb_by_phase": mem.peaks,
        "notes": notes,
        "calibration_samples_used": samples,
        "world_size": distributed.rank_info().world_size,  # torch.distributed ranks (1: one process)
        "calibration_samples_per_rank": distributed.samples_per_rank(batches),
        "data": w.data,
        "layers": layers,
    }
    if tmp is None:  # a rank > 0: rank 0 writes the outputs
        return record
    stage("writing the report and the packed model")
    with mem.phase("export"):
        save_quantized(w.model, tmp, w.name, recipe)  # a path is stored resolved
        recipe.save(tmp / "recipe.yaml", overwrite=True)
        plot_sqnr(layers, tmp / "sqnr.png", f"{model_name} {recipe.weights} {recipe.method}: per-layer output SQNR")
    record["peak_rss_mb"] = mem.total
    record["peak_rss_exact_phases"] = mem.exact
    write_report(record, tmp)
    return record


def _measure(w) -> dict:
    """The workload's metrics of its model; under torch.distributed on rank 0 only ({} elsewhere)."""
    return w.evaluate(w.model) if distributed.is_main() else {}


def run_evaluate(out: Path, stage=lambda text: None, eval_data: str | None = None, lm_eval_tasks=None,
                 lm_eval_include: str | None = None, lm_eval_limit: int | None = None) -> dict:  # fmt: skip
    """Reload ``out/model.safetensors`` onto a fresh float model and re-measure (on ``eval_data`` when given);
    returns {"model", "stored": report metrics or None (None too when the data differs from the report's),
    "measured": metrics, "same"}, and with ``lm_eval_tasks`` {"lm_eval": {"float": ..., "quantized": ...}}
    (:mod:`numcast.evaluate.lm_eval`, causal LMs)."""
    path = out / MODEL_FILE if out.is_dir() else out
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no packed model (run `numcast quantize ... --out DIR` first)")
    model_name, _recipe = read_metadata(path)
    stage(f"loading {model_name}")
    w = load_workload(model_name, eval_data=eval_data, dtype=read_dtype(path))
    harness = {}
    if lm_eval_tasks:
        from numcast.evaluate.lm_eval import run_lm_eval

        if w.tokenizer is None:
            raise ValueError(f"{model_name}: lm-eval runs causal language models; this one is not")
        stage("lm-eval on the float model")
        kw = {"include_path": lm_eval_include, "limit": lm_eval_limit}
        harness["float"] = run_lm_eval(w.model, w.tokenizer, lm_eval_tasks, **kw)
    if w.reference_from_first_evaluation:  # its comparison metrics refer to the float model: measured first
        stage("measuring the float model")
        w.evaluate(w.model)
    stage("loading the packed weights")
    load_quantized(w.model, path)
    stage("measuring")
    measured = w.evaluate(w.model)
    report = path.parent / "report.json"
    stored = None
    if report.is_file():
        rec = json.loads(report.read_text())
        if (rec.get("data") or {}).get("evaluation") == w.data.get("evaluation"):  # the same evaluation data
            stored = rec["metrics"]["quantized"]
    same = stored is not None and all(stored.get(k) == json_safe(v) for k, v in measured.items())
    if lm_eval_tasks:
        stage("lm-eval on the quantized model")
        harness["quantized"] = run_lm_eval(w.model, w.tokenizer, lm_eval_tasks, **kw)
    res = {"model": model_name, "stored": stored, "measured": measured, "primary_metric": w.primary, "same": same}
    return {**res, "lm_eval": harness} if harness else res


def export(target, to: str, out: str | Path, *, float_fallback: bool = False, overwrite: bool = False,
           tokenizer=None, gguf_file: str | Path | None = None, example_inputs=None,
           stage=lambda text: None) -> ExportResult:  # fmt: skip
    """Export a quantized model to ``to`` (``gguf``, ``compressed-tensors``, ``qonnx``: :mod:`numcast.interop.export`)
    at ``out``, atomically, writing numcast's own codes and scales (nothing is re-quantized).

    ``target``: a directory (or packed ``model.safetensors``) written by ``numcast quantize``, whose model is
    reloaded bit-exactly (its tokenizer, source GGUF and report come with it); or a quantized model / the
    :class:`~numcast.pipeline.plan.QuantizationResult` of :func:`numcast.quantize_model`, with ``tokenizer``,
    ``gguf_file`` (a GGUF to copy llama.cpp metadata and tokenizer from) and ``example_inputs`` (a batch, for
    QONNX) given here. ``float_fallback``: write layers the target cannot store unquantized (listed in the
    result) instead of failing."""
    exporter = get_exporter(to)
    if gguf_file is not None and to != "gguf":
        raise ValueError(f"--gguf-metadata copies llama.cpp metadata into a GGUF file; it does nothing for --to {to}")
    if isinstance(target, (str, Path)):
        source = _run_source(Path(target), exporter.needs_inputs, stage)
    else:
        model, recipe = (target.model, target.recipe) if hasattr(target, "recipe") else (target, None)
        if recipe is None:  # a bare model: the recipe records its (first) weight format
            first = next(iter(quantized_layers(model).values())).qweight.format
            recipe = Recipe(weights=first.name or first.label)
        name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)
        if exporter.needs_inputs and example_inputs is None:
            raise ValueError(f"{to} export traces the model: pass example_inputs=<a batch of its inputs>")
        source = ExportSource(model, name, recipe, tokenizer, example_inputs=example_inputs)
    if gguf_file is not None:  # given here, it overrides the run's source GGUF
        source.gguf_file = Path(gguf_file)
    stage(f"writing {to}")
    return export_model(source, to, out, float_fallback=float_fallback, overwrite=overwrite)


def _run_source(run: Path, needs_inputs: bool, stage) -> ExportSource:
    """The quantized model of a ``numcast quantize`` output, reloaded, with what an exporter reads."""
    path = run / MODEL_FILE if run.is_dir() else run
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no packed model (run `numcast quantize ... --out DIR` first)")
    model_name, recipe = read_metadata(path)
    stage(f"loading {model_name}")
    w = load_workload(model_name, dtype=read_dtype(path))
    load_quantized(w.model, path)
    report_file = path.parent / "report.json"
    report = json.loads(report_file.read_text()) if report_file.is_file() else None
    src = w.source
    gguf_file = src if src is not None and src.is_file() and src.suffix.lower() == ".gguf" else None
    hf_folder = src if src is not None and src.is_dir() else None
    inputs = w.calibration(1)[0] if needs_inputs else None
    return ExportSource(w.model, model_name, recipe, w.tokenizer, hf_folder, gguf_file, report, inputs)


def run_accumulator(target: str, input_bits: int, accumulator_bits: int, *, weights: str = "int8_channel",
                    samples: int = 32, mode: str = "wrap", out: Path | None = None, overwrite: bool = False,
                    tile: int | None = None, tile_bits: int | None = None,
                    stage=lambda text: None) -> dict:  # fmt: skip
    """The accumulator analysis (:mod:`numcast.evaluate.accumulator`) of ``target``: a directory (or packed file)
    written by ``numcast quantize``, or a model name / path quantized here with RTN ``weights``. Writes
    ``accumulator.json`` and ``accumulator.png`` into ``out`` (default: the quantize directory, or
    ``out/accumulator-<model>``); existing files of those names are replaced only with ``overwrite``."""
    from numcast.evaluate.accumulator import analyze_model, rows_to_records

    if samples < 1:
        raise ValueError("the analysis needs calibration samples: pass --samples N with N >= 1")
    check_bits("--input-bits", input_bits, 1, 32)
    check_bits("--accumulator-bits", accumulator_bits, 2, 62)
    if (tile is None) != (tile_bits is None):
        raise ValueError("--tile and --tile-bits go together (tiles of T inputs summed in registers of B bits)")
    if tile is not None:
        check_bits("--tile", tile, 1, 1 << 30)
        check_bits("--tile-bits", tile_bits, 2, 62)
    path = Path(target)
    packed = path / MODEL_FILE if path.is_dir() else path
    if packed.is_file() and packed.suffix == ".safetensors":
        model_name, recipe = read_metadata(packed)
        stage(f"loading {model_name}")
        w = load_workload(model_name, dtype=read_dtype(packed))
        load_quantized(w.model, packed)
        source = f"{packed} ({recipe.weights} weights, {recipe.method})"
        out = out or packed.parent
    else:
        stage(f"loading {target}")
        w = load_workload(target)
        stage(f"quantizing the weights to {weights} (RTN)")
        quantize_data_free(w.model, Recipe(weights=weights), inplace=True)
        source = f"{w.name} ({weights} weights, RTN)"
        out = out or Path("out") / f"accumulator-{w.name}"
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "accumulator.json", out / "accumulator.png"]
    if not overwrite and any(f.exists() for f in files):
        raise FileExistsError(f"{out} already has accumulator.json / accumulator.png; pass --overwrite to replace them")
    stage(f"preparing {samples} calibration samples")
    batches = w.calibration(samples)
    stage("simulating the accumulators")
    rows, skipped = analyze_model(w.model, batches, input_bits, accumulator_bits, mode=mode, tile=tile,
                                  tile_bits=tile_bits)  # fmt: skip
    if not rows:
        why = "; ".join(f"{n}: {r}" for n, r in skipped[:3]) or "the model has no quantized linear/conv layer"
        raise ValueError(f"no layer could be analysed, so nothing is proven ({len(skipped)} quantized layers skipped: "
                         f"{why}); the accumulator analysis needs integer weights with one scale per output channel "
                         "or tensor (e.g. int8_channel)")
    records = rows_to_records(rows)
    record = {
        "model": w.name,
        "source": source,
        "accumulator_bits": accumulator_bits,
        "input_bits": input_bits,
        "mode": mode,
        "tile": tile,
        "tile_bits": tile_bits,
        "samples": samples,
        "layers": records,
        "skipped": [{"name": n, "reason": r} for n, r in skipped],
    }
    write_atomic(files[0], lambda tmp: tmp.write_text(json_text(record)))
    title = f"{w.name}: accumulator bits per layer ({source})"
    write_atomic(files[1], lambda tmp: plot_accumulator(records, accumulator_bits, tmp, title))
    record["files"] = [str(f) for f in files if f.exists()]
    return record
