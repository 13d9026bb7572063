"""``quantize_data_free``: swap a model's layers for numcast's quantized ones by recipe, with a method that needs
no calibration statistics (RTN, EP-init), and say what happened to every module that holds parameters (no layer
is skipped silently). Methods that learn from calibration data run in :mod:`numcast.pipeline.runner`; the one
call for both is :func:`numcast.pipeline.quantize_model.quantize_model`."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from numcast.libc import page_out_module
from numcast.nn.act_quant import ActQuantizer, calibrate
from numcast.nn.convert import make_quantizable
from numcast.nn.observe import call_model
from numcast.nn.surgery import set_module
from numcast.pipeline.padding import observing_real_tokens, token_mask
from numcast.pipeline.plan import (
    QuantizationResult,
    check_finite_weights,
    layer_reports,
    make_quant_module,
    plan_layers,
    resolve_plans,
    resolved_recipe,
)
from numcast.pipeline.recipe import Recipe


def quantize_data_free(
    model: nn.Module,
    recipe: Recipe,
    calibration: Iterable | None = None,
    *,
    inplace: bool = False,
) -> QuantizationResult:
    """Quantize ``model`` by ``recipe`` with a method that solves each layer from its weights alone (``rtn``,
    ``ep-init``; any ``recipe.accumulator`` constraint also applies, see :mod:`numcast.pipeline.accumulator`).

    ``calibration`` (an iterable of model inputs: tensors, tuples or dicts of keyword arguments) is needed
    for static activation scales, input signs and mixed precision; it is checked before any work. Methods that
    need calibration statistics (GPTQ, ...) are refused here, naming the block-wise runner."""
    method = recipe.make_method()
    if method.needs_calibration:
        raise ValueError(f"method {recipe.method!r} runs in the layer-wise calibration pipeline "
                         "(numcast.quantize_model), not in quantize_data_free")
    static = recipe.activations is not None and recipe.activation_mode == "static"
    batches = list(calibration) if calibration is not None else []
    if static and not batches:
        raise ValueError("static activation scales need calibration data (got none)")
    if not inplace:
        model = copy.deepcopy(model)
    make_quantizable(model)
    plans = plan_layers(model, recipe)
    # each weight is checked just before its cast reads it (one read of a memory-mapped checkpoint, not a check
    # up front that gives the pages back and the cast faulting them in again); nothing is installed until every
    # layer has passed, so a broken one leaves the model as it was. Mixed precision reads every weight first.
    check_up_front = recipe.mixed_precision.to_decide
    resolve_plans(model, plans, recipe, batches, check_finite=check_up_front)
    done = []
    for plan in plans:
        if plan.quantized:
            if not check_up_front and not plan.module.weight.is_meta:
                check_finite_weights([plan])
            qweight = None if method.rounds_to_nearest_only else method.quantize_layer(plan)  # plain RTN: the
            done.append((plan, make_quant_module(plan, recipe, qweight=qweight)))  # layer rounds its own weight
            page_out_module(plan.module)  # the float layer's pages of a memory-mapped checkpoint go back
    for plan, new in done:
        set_module(model, plan.name, new)
        plan.module, plan.method = new, method.name
    if static:
        calibrate_activations(model, batches)
    return QuantizationResult(model, layer_reports(plans), recipe=resolved_recipe(recipe, plans))


@torch.no_grad()
def calibrate_activations(model: nn.Module, batches: list, only_uncalibrated: bool = False) -> None:
    """Calibrate every static activation quantizer of ``model`` (or only those not calibrated yet) on
    ``batches`` (one pass)."""
    quants = [m for m in model.modules() if isinstance(m, ActQuantizer) and m.mode == "static"]
    if only_uncalibrated:
        quants = [q for q in quants if not q.calibrated]

    def run() -> None:
        for b in batches:
            with observing_real_tokens(quants, token_mask(b)):
                call_model(model, b)

    calibrate(quants, run)
