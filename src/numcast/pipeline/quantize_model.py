"""``quantize_model``: swap a model's layers for numcast's quantized ones by recipe, and say what happened to
every module that holds parameters (no layer is skipped silently)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from numcast.nn.act_quant import ActQuantizer, calibrate
from numcast.nn.observe import call_model
from numcast.nn.surgery import quant_class, set_module, why_not_quantizable
from numcast.pipeline.recipe import Recipe


@dataclass
class LayerReport:
    name: str
    type: str
    action: str  # "quantized" | "skipped"
    weight_format: str | None = None
    activation_format: str | None = None
    reason: str | None = None
    params: int = 0
    method: str | None = None
    sqnr_db: float | None = None  # output SQNR on calibration data (quantized-stream inputs), when measured
    accumulator_bits: int | None = None  # exact accumulator bits the integer weights need (accumulator-aware recipes)


@dataclass
class QuantizationResult:
    model: nn.Module
    layers: list[LayerReport] = field(default_factory=list)
    wall_time_s: float = 0.0
    recipe: Recipe | None = None  # as resolved: mixed-precision formats and input signs become per-layer overrides

    @property
    def quantized(self) -> list[LayerReport]:
        return [r for r in self.layers if r.action == "quantized"]

    @property
    def skipped(self) -> list[LayerReport]:
        return [r for r in self.layers if r.action == "skipped"]

    def to_records(self) -> list[dict]:
        return [asdict(r) for r in self.layers]


def _is_lm_head(name: str) -> bool:
    return name == "lm_head" or name.endswith(".lm_head")


@dataclass
class LayerPlan:
    name: str
    module: nn.Module
    qcls: type
    weight_format: str
    activation_format: str | None


def plan_layers(model: nn.Module, recipe: Recipe) -> tuple[list[LayerPlan], list[LayerReport]]:
    """Decide, for every module that holds parameters, whether and how it is quantized.

    Returns the layers to quantize and one report entry per parameter-holding module (skips say why;
    layer types numcast cannot quantize also raise a warning naming the layer)."""
    report: list[LayerReport] = []
    todo: list[LayerPlan] = []
    for name, module in model.named_modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        if own == 0:
            continue
        kind = type(module).__name__
        qcls = quant_class(module)

        def skip(reason: str, own=own, kind=kind, name=name) -> None:
            report.append(LayerReport(name, kind, "skipped", reason=reason, params=own))

        if qcls is None:
            reason = why_not_quantizable(module)
            skip(reason)
            if "not supported" in reason or "no numcast" in reason:
                warnings.warn(f"numcast cannot quantize {name} ({reason})", stacklevel=3)
            continue
        if isinstance(module, nn.Embedding) and not recipe.quantize_embeddings:
            skip("embeddings stay in float (quantize_embeddings=False)")
            continue
        if _is_lm_head(name) and not recipe.quantize_lm_head:
            skip("LM head stays in float (quantize_lm_head=False)")
            continue
        w, a, why = recipe.layer_settings(name)
        if why:
            skip(why)
            continue
        if isinstance(module, nn.Embedding):
            a = None
        todo.append(LayerPlan(name, module, qcls, w, a))
        report.append(LayerReport(name, kind, "quantized", w, a, params=own))
    return todo, report


def make_quant_module(plan: LayerPlan, recipe: Recipe, qweight=None, defer_static: bool = False) -> nn.Module:
    """The numcast replacement of ``plan.module`` (``qweight``: a solver's result; default RTN). With
    ``defer_static`` a static input quantizer passes inputs through until it is calibrated."""
    kwargs = {"qweight": qweight}
    if plan.activation_format is not None:
        axis = 1 if isinstance(plan.module, (nn.Conv1d, nn.Conv2d)) else -1
        act = ActQuantizer(plan.activation_format, recipe.activation_mode, recipe.activation_observer, axis)
        act.bypass = defer_static and act.mode == "static"
        kwargs["input_format"] = act
    return plan.qcls(plan.module, plan.weight_format, **kwargs)


def quantize_model(
    model: nn.Module,
    recipe: Recipe,
    calibration: Iterable | None = None,
    *,
    inplace: bool = False,
) -> QuantizationResult:
    """Quantize ``model`` by ``recipe`` with round-to-nearest weights (``method="rtn"``; ``"ep-init"`` and any
    ``recipe.accumulator`` constraint also apply here, see :mod:`numcast.pipeline.accumulator`).

    ``calibration`` (an iterable of model inputs: tensors, tuples or dicts of keyword arguments) is needed
    for static activation scales; it is checked before any work. GPTQ needs the layer-wise calibration
    runner (:mod:`numcast.pipeline.runner`) and is refused here with that reason.
    """
    if recipe.method not in ("rtn", "ep-init"):
        raise ValueError(f"method {recipe.method!r} runs in the layer-wise calibration pipeline, not in quantize_model")
    static = recipe.activations is not None and recipe.activation_mode == "static"
    batches = list(calibration) if calibration is not None else []
    if static and not batches:
        raise ValueError("static activation scales need calibration data (got none)")
    if not inplace:
        model = copy.deepcopy(model)
    todo, report = plan_layers(model, recipe)
    recipe = prepare_plans(model, todo, report, recipe, batches)
    entry = {r.name: r for r in report}
    for plan in todo:
        qt = finish_qweight(plan, recipe, None, entry[plan.name])
        set_module(model, plan.name, make_quant_module(plan, recipe, qweight=qt))
    if static:
        calibrate_activations(model, batches)
    return QuantizationResult(model, report, recipe=recipe)


def prepare_plans(model: nn.Module, todo: list[LayerPlan], report: list[LayerReport], recipe: Recipe,
                  batches: list) -> Recipe:  # fmt: skip
    """Decisions taken before any layer is quantized, on the float model; returns the recipe to use (with the
    decisions as per-layer overrides). Mixed precision picks each layer's weight format
    (:func:`numcast.pipeline.mixed_precision.resolve_mixed_precision`); an accumulator-aware recipe then has
    every layer's weight format checked and the layers' input signs resolved
    (:func:`numcast.pipeline.accumulator.resolve_input_signs`)."""
    if recipe.mixed_precision.strategy is not None:
        from numcast.pipeline.mixed_precision import resolve_mixed_precision

        recipe = resolve_mixed_precision(model, todo, report, recipe, batches)
    if recipe.accumulator.bits is None:
        return recipe
    from numcast.pipeline.accumulator import check_weight_format, resolve_input_signs

    for p in todo:
        check_weight_format(p.name, p.weight_format)
    recipe = resolve_input_signs(model, todo, recipe, batches)
    entry = {r.name: r for r in report}
    for p in todo:
        entry[p.name].activation_format = p.activation_format
    return recipe


def finish_qweight(plan: LayerPlan, recipe: Recipe, solved, entry: LayerReport | None = None):
    """The layer's QTensor: ``solved`` (None: the module default, RTN), or under an accumulator-aware recipe the
    constrained weights (:func:`numcast.pipeline.accumulator.layer_qweight`), whose needs go in ``entry``."""
    if recipe.accumulator.bits is None:
        return solved
    from numcast.pipeline.accumulator import accumulator_needs, layer_qweight

    qt = layer_qweight(plan, recipe, solved)
    if entry is not None:
        entry.accumulator_bits = accumulator_needs(qt, plan.activation_format)
    return qt


@torch.no_grad()
def calibrate_activations(model: nn.Module, batches: list, only_uncalibrated: bool = False) -> None:
    """Calibrate every static activation quantizer of ``model`` (or only those not calibrated yet) on
    ``batches`` (one pass)."""
    quants = [m for m in model.modules() if isinstance(m, ActQuantizer) and m.mode == "static"]
    if only_uncalibrated:
        quants = [q for q in quants if not q.calibrated]
    calibrate(quants, lambda: [call_model(model, b) for b in batches])
