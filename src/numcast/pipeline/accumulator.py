"""Accumulator-aware quantization in the pipeline: every quantized layer's integer weights meet the L1 budget
of its accumulator width P, whatever the method (papers.md §3).

- :func:`resolve_input_signs`: one pass of the float model over the calibration batches; a layer whose inputs
  are never negative gets the unsigned twin of its activation format (``accumulator.input_sign="auto"``),
  written into the recipe as a per-layer override so the saved recipe rebuilds the same model.
- :func:`layer_qweight`: the layer's final QTensor through :func:`numcast.algorithms.ep_init.fit_budget`
  (projection onto the budget, rounding within it). ``ep-init``: of the float weights in units of the
  format's own per-channel scale (absmax / qmax). Any other method: of its solution's integer codes (RTN by
  default), scales unchanged, so rows already within the budget stay as solved (numcast's extension: the
  guarantee for every PTQ method).
- :func:`accumulator_needs`: the bits a layer's integer weights need (exact rule), for the report.

Weight formats must be integers with one scale per output channel or per tensor (``int4_channel``,
``int8_tensor``, ...): with finer scales (groups, blocks) the dot product is not one integer sum.
"""

from __future__ import annotations

import torch
from torch import nn

from numcast.accumulator.bounds import min_accumulator_bits
from numcast.accumulator.codes import integer_codes, integer_sum_reason, per_row, qtensor_from_codes
from numcast.algorithms.ep_init import fit_budget, l1_budget
from numcast.algorithms.rtn import rtn
from numcast.formats.ops import core
from numcast.formats.qtensor import QTensor
from numcast.formats.registry import get_format
from numcast.nn.observe import call_model, observe_inputs
from numcast.pipeline.recipe import LayerOverride, Recipe


def check_weight_format(name: str, fmt_name: str) -> int:
    """Weight bits M of an accumulator-constrained layer; ``ValueError`` naming the layer otherwise."""
    fmt = get_format(fmt_name)
    if integer_sum_reason(fmt) is not None or not fmt.element.signed:
        raise ValueError(
            f"{name}: accumulator-aware quantization needs signed integer weights with one scale per output channel "
            f"or tensor (e.g. int4_channel, int8_tensor), got {fmt_name}"
        )
    return fmt.element.bits


def input_spec(fmt_name: str) -> tuple[int, bool]:
    """(N, signed) of an integer activation format."""
    el = get_format(fmt_name).element
    return el.bits, el.signed


def layer_budget(plan, recipe: Recipe) -> tuple[float, int]:
    """(T, M) of a planned layer: its L1 budget and weight bits."""
    m = check_weight_format(plan.name, plan.weight_format)
    n, signed = input_spec(plan.activation_format)
    return l1_budget(recipe.accumulator.rule, recipe.accumulator.bits, n, signed), m


def layer_qweight(plan, recipe: Recipe, solved: QTensor | None = None) -> QTensor:
    """The QTensor a layer ends with under an accumulator-aware ``recipe`` (see module docstring)."""
    T, m = layer_budget(plan, recipe)
    acc = recipe.accumulator
    w = plan.module.weight.detach().reshape(plan.module.weight.shape[0], -1).float()
    if solved is None and recipe.method == "ep-init":
        s = core(w, get_format(plan.weight_format)).scales.scale  # the format's own scale (absmax / qmax)
        q = fit_budget(w.double() / per_row(s, w.shape[0])[:, None], m, T, acc.rule, acc.rounding)
        return qtensor_from_codes(q, s, plan.weight_format)
    qt = solved if solved is not None else rtn(w, plan.weight_format)
    q = fit_budget(integer_codes(qt), m, T, acc.rule, acc.rounding)
    return qtensor_from_codes(q, qt.scales(), plan.weight_format)


def accumulator_needs(qt: QTensor, activation_format: str) -> int:
    """Exact accumulator bits the layer's integer weights need for its N-bit inputs (max over channels)."""
    n, signed = input_spec(activation_format)
    return int(min_accumulator_bits(integer_codes(qt).long(), n, signed, "exact").max())


@torch.no_grad()
def resolve_input_signs(model: nn.Module, plans: list, recipe: Recipe, batches: list) -> Recipe:
    """A copy of ``recipe`` in which every planned layer whose inputs (float model, calibration batches) are
    never negative takes the unsigned twin of its signed activation format, as a per-layer override; the
    plans' ``activation_format`` are updated to match. ``recipe`` itself is not modified."""
    if recipe.accumulator.input_sign != "auto":
        return recipe
    stats = observe_inputs({p.name: p.module for p in plans}, lambda: [call_model(model, b) for b in batches])
    extra = []
    for p in plans:
        fmt = get_format(p.activation_format)
        if fmt.element.signed and stats[p.name].nonnegative:
            p.activation_format = "u" + p.activation_format
            get_format(p.activation_format)  # the unsigned twin exists for every intN_tensor
            extra.append(LayerOverride(pattern=p.name, activations=p.activation_format))
    if not extra:
        return recipe
    resolved = recipe.with_overrides(extra)
    resolved.accumulator.input_sign = "format"  # decided: the saved recipe replays these formats as they are
    return resolved
