"""Every decision about a layer, taken once, in one record (:class:`LayerPlan`); the report and the resolved
recipe are derived from the final plans in one place at the end.

1. :func:`plan_layers`: one plan per module that holds parameters: quantized (weight and input formats from the
   recipe) or kept in float, and why.
2. :func:`resolve_plans`: the decisions taken on the float model before any layer is quantized: mixed precision
   picks each layer's weight format (:mod:`numcast.pipeline.mixed_precision`); an accumulator-aware recipe has
   every weight format checked and the layers' input signs resolved (:mod:`numcast.pipeline.accumulator`).
3. While quantizing, the runner records what happened (``method``, ``sqnr_db``, ``accumulator_bits``).
4. :func:`layer_reports` and :func:`resolved_recipe`: the report entries and the recipe that replays the run
   (decided formats as per-layer overrides), both read off the plans.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from numcast.libc import page_out_file_pages
from numcast.nn.act_quant import ActQuantizer
from numcast.nn.surgery import quant_class, why_not_quantizable
from numcast.pipeline.accumulator import check_budgets, check_weight_format, resolve_input_signs
from numcast.pipeline.layer_plan import LayerPlan, LayerReport
from numcast.pipeline.mixed_precision import resolve_mixed_precision
from numcast.pipeline.recipe import LayerOverride, Recipe


@dataclass
class QuantizationResult:
    """The quantized model (changed in place), what happened to every layer, and the recipe that replays it."""

    model: nn.Module
    layers: list[LayerReport] = field(default_factory=list)
    wall_time_s: float = 0.0
    recipe: Recipe | None = None  # as resolved: mixed-precision formats and input signs as per-layer overrides

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


def plan_layers(model: nn.Module, recipe: Recipe) -> list[LayerPlan]:
    """One plan per module that holds parameters, in model order (layer types numcast cannot quantize also raise
    a warning naming the layer)."""
    plans: list[LayerPlan] = []
    for name, module in model.named_modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        if own == 0:
            continue
        plan = LayerPlan(name, module, type(module).__name__, own)
        plans.append(plan)
        qcls = quant_class(module)
        if isinstance(module, nn.Embedding) and not recipe.quantize_embeddings:
            plan.reason = "embeddings stay in float (quantize_embeddings=False)"
        elif qcls is None:
            plan.reason = why_not_quantizable(module)
            if "not supported" in plan.reason or "no numcast" in plan.reason:
                warnings.warn(f"numcast cannot quantize {name} ({plan.reason})", stacklevel=3)
        elif _is_lm_head(name) and not recipe.quantize_lm_head:
            plan.reason = "LM head stays in float (quantize_lm_head=False)"
        else:
            w, a, why = recipe.layer_settings(name)
            if why:
                plan.reason = why
            else:
                plan.qcls, plan.weight_format = qcls, w
                plan.activation_format = None if isinstance(module, nn.Embedding) else a
    _check_patterns(recipe, [p.name for p in plans])
    return plans


def _check_patterns(recipe: Recipe, names: list[str]) -> None:
    """Every include/exclude/override glob must match a module that holds parameters: one that matches none
    does nothing, which is an error (a typo would otherwise quantize what the user meant to keep, or not)."""
    patterns = [("include", p) for p in recipe.include if p != "*"] + [("exclude", p) for p in recipe.exclude]
    patterns += [("override", o.pattern) for o in recipe.overrides]
    for kind, pat in patterns:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise ValueError(f"{kind} pattern {pat!r} matches no layer of the model (layers with parameters: "
                             f"{shown}; `*` matches dots too)")  # fmt: skip


def check_finite_weights(plans: list[LayerPlan], page_out: bool = False) -> None:
    """``ValueError`` naming the first layer whose weight holds NaN or inf. With ``page_out`` a weight read from a
    memory-mapped checkpoint has its pages given back after its check (:func:`~numcast.libc.page_out_file_pages`):
    checking a whole model up front would otherwise leave all of it resident before the first layer is solved."""
    for p in plans:
        w = p.module.weight.detach()
        finite = w.numel() and all(map(math.isfinite, torch.aminmax(w)))  # one pass; NaN and ±inf reach the extremes
        if page_out:
            page_out_file_pages(w)
        if finite:
            continue
        bad = int((~torch.isfinite(w)).sum())
        if bad:
            raise ValueError(f"{p.name}: {bad} weight(s) are NaN or inf; numcast does not quantize a broken layer "
                             "(exclude it, or fix the checkpoint)")  # fmt: skip


def resolve_plans(model: nn.Module, plans: list[LayerPlan], recipe: Recipe, batches: list,
                  check_finite: bool = True) -> None:  # fmt: skip
    """The decisions taken on the float model before any layer is quantized (module docstring, step 2); they
    change the plans only. Every weight to quantize is first checked to be finite (a memory-mapped one given back
    after its check), unless ``check_finite`` is False: a caller that checks each layer just before it reads it
    and installs nothing until all have passed (:func:`numcast.pipeline.data_free.quantize_data_free`)."""
    todo = [p for p in plans if p.quantized]
    if not todo:
        why = "; ".join(f"{p.name}: {p.reason}" for p in plans[:4]) or "the model holds no parameters"
        raise ValueError(f"nothing to quantize: all {len(plans)} modules with parameters stay in float ({why}"
                         f"{'; ...' if len(plans) > 4 else ''})")  # fmt: skip
    if check_finite:
        check_finite_weights([p for p in todo if not p.module.weight.is_meta], page_out=True)  # offloaded: at load
    if recipe.mixed_precision.to_decide:
        if any(p.module.weight.is_meta for p in todo):
            raise ValueError("mixed precision measures every layer before quantizing; it does not run with the "
                             "weights offloaded to disk (--offload disk)")  # fmt: skip
        resolve_mixed_precision(model, todo, recipe.mixed_precision, batches)
    if recipe.accumulator.bits is not None:
        for p in todo:
            check_weight_format(p.name, p.weight_format)
        if recipe.accumulator.input_sign == "auto":
            resolve_input_signs(model, todo, batches)
        check_budgets(todo, recipe.accumulator)


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


def layer_reports(plans: list[LayerPlan]) -> list[LayerReport]:
    """The report entry of every plan."""
    return [
        LayerReport(p.name, p.kind, "quantized" if p.quantized else "skipped", p.weight_format, p.activation_format,
                    p.reason, p.params, p.method, p.sqnr_db, p.accumulator_bits)  # fmt: skip
        for p in plans
    ]


def resolved_recipe(recipe: Recipe, plans: list[LayerPlan]) -> Recipe:
    """The recipe that rebuilds the same model: ``recipe`` (not modified) with the formats decided while planning
    as per-layer overrides (every layer's weights when mixed precision chose them, the inputs whose sign was
    resolved), and those decisions marked as taken."""
    mixed = recipe.mixed_precision.to_decide
    signs = recipe.accumulator.bits is not None and recipe.accumulator.input_sign == "auto"
    if not (mixed or signs):
        return recipe
    extra = []
    for p in plans:
        if not p.quantized:
            continue
        _, given, _ = recipe.layer_settings(p.name)
        activations = p.activation_format if signs and p.activation_format != given else None
        if mixed or activations:
            extra.append(LayerOverride(pattern=p.name, weights=p.weight_format if mixed else None,
                                       activations=activations))  # fmt: skip
    if not extra:
        return recipe
    resolved = recipe.with_overrides(extra)
    if mixed:
        resolved.mixed_precision.decided = True  # the saved recipe replays these formats as they are
    if signs:
        resolved.accumulator.input_sign = "format"
    return resolved
