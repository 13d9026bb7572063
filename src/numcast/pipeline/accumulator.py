"""Accumulator-aware quantization in the pipeline: every quantized layer's integer weights meet the L1 budget
of its accumulator width P, whatever the method (papers.md §3).

- :func:`resolve_input_signs`: one pass of the float model over the calibration batches; a layer whose inputs
  are never negative gets the unsigned twin of its activation format (``accumulator.input_sign="auto"``; the
  plan records it, and the saved recipe replays it as a per-layer override).
- :func:`ep_init_qweight` (the ``ep-init`` method) and :func:`within_budget` (every other method) go through
  :func:`numcast.algorithms.ep_init.fit_budget` (projection onto the budget, rounding within it): EP-init of
  the float weights in units of the format's own per-channel scale (absmax / qmax); any other method of its
  solution's integer codes, scales unchanged, so rows already within the budget stay as solved (numcast's
  extension: the guarantee for every PTQ method).
- :func:`accumulator_needs`: the bits a layer's integer weights need (exact rule), for the report.

Weight formats must be integers with one scale per output channel or per tensor (``int4_channel``,
``int8_tensor``, ...): with finer scales (groups, blocks) the dot product is not one integer sum.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from numcast.accumulator.bounds import min_accumulator_bits
from numcast.accumulator.codes import integer_codes, integer_sum_reason, per_row, qtensor_from_codes
from numcast.algorithms.ep_init import fit_budget, l1_budget
from numcast.formats.engine import grid_cast
from numcast.formats.qtensor import QTensor
from numcast.formats.registry import get_format
from numcast.nn.observe import call_model, observe_inputs
from numcast.pipeline.settings import AccumulatorSettings


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


def layer_budget(plan, settings: AccumulatorSettings) -> tuple[float, int]:
    """(T, M) of a planned layer: its L1 budget and weight bits."""
    m = check_weight_format(plan.name, plan.weight_format)
    n, signed = input_spec(plan.activation_format)
    return l1_budget(settings.rule, settings.bits, n, signed), m


def smallest_workable_bits(plan, settings: AccumulatorSettings) -> int:
    """The smallest accumulator width whose budget lets the layer keep any non-zero weight (T ≥ 1)."""
    n, signed = input_spec(plan.activation_format)
    for bits in range(2, 63):
        if l1_budget(settings.rule, bits, n, signed) >= 1:
            return bits
    return 63


def check_budgets(plans: list, settings: AccumulatorSettings) -> None:
    """``ValueError`` when the accumulator width leaves some layer a budget below one integer step (every weight
    would round to zero), naming each such layer and the smallest width that works for it."""
    starved = [p for p in plans if layer_budget(p, settings)[0] < 1]
    if starved:
        need = ", ".join(f"{p.name} ({p.activation_format} inputs): P >= {smallest_workable_bits(p, settings)}"
                         for p in starved[:6])  # fmt: skip
        raise ValueError(f"a {settings.bits}-bit accumulator leaves {len(starved)} layer(s) no room for a single "
                         f"non-zero weight under the {settings.rule} rule: {need}")  # fmt: skip


def ep_init_qweight(plan, settings: AccumulatorSettings) -> QTensor:
    """EP-init as PTQ: the layer's float weights in units of its format's own per-channel scale (absmax / qmax),
    projected onto its budget and rounded within it."""
    T, m = layer_budget(plan, settings)
    w = plan.module.weight.detach().reshape(plan.module.weight.shape[0], -1).float()
    s = grid_cast(w, get_format(plan.weight_format)).scales.scale
    y = w.double() / per_row(s, w.shape[0])[:, None]
    q = fit_budget(y, m, T, settings.rule, settings.rounding)
    _warn_if_starved(plan, y.round(), q, settings)
    return qtensor_from_codes(q, s, plan.weight_format)


def _warn_if_starved(plan, unconstrained: torch.Tensor, fitted: torch.Tensor, settings: AccumulatorSettings) -> None:
    """Warn when the budget sets more than half of a layer's weights to zero (and more than without it)."""
    zeros, before = float((fitted == 0).double().mean()), float((unconstrained == 0).double().mean())
    if zeros > 0.5 and zeros > before:
        warnings.warn(f"{plan.name}: the {settings.bits}-bit accumulator budget sets {100 * zeros:.0f} % of its "
                      f"weights to zero ({100 * before:.0f} % without it); a wider accumulator keeps more of the "
                      "layer", stacklevel=3)  # fmt: skip


def within_budget(plan, qt: QTensor, settings: AccumulatorSettings) -> QTensor:
    """A solver's QTensor with its integer codes fitted into the layer's budget (scales unchanged; rows already
    within the budget stay as solved); records the bits the result needs in ``plan.accumulator_bits``."""
    T, m = layer_budget(plan, settings)
    codes = integer_codes(qt)
    q = fit_budget(codes, m, T, settings.rule, settings.rounding)
    _warn_if_starved(plan, codes, q, settings)
    fitted = qtensor_from_codes(q, qt.scales(), plan.weight_format)
    plan.accumulator_bits = accumulator_needs(fitted, plan.activation_format)
    return fitted


def accumulator_needs(qt: QTensor, activation_format: str) -> int:
    """Exact accumulator bits the layer's integer weights need for its N-bit inputs (max over channels)."""
    n, signed = input_spec(activation_format)
    return int(min_accumulator_bits(integer_codes(qt).long(), n, signed, "exact").max())


@torch.no_grad()
def resolve_input_signs(model: nn.Module, plans: list, batches: list) -> None:
    """Every planned layer whose inputs (float model, calibration batches) are never negative takes the unsigned
    twin of its signed activation format (``plan.activation_format``)."""
    stats = observe_inputs({p.name: p.module for p in plans}, lambda: [call_model(model, b) for b in batches])
    for p in plans:
        if get_format(p.activation_format).element.signed and stats[p.name].nonnegative:
            p.activation_format = "u" + p.activation_format
            get_format(p.activation_format)  # the unsigned twin exists for every intN_tensor
