"""Mixed precision in the pipeline: which candidate weight format each layer gets under a size budget, decided
before any layer is quantized (:mod:`numcast.algorithms.mixed_precision`).

- ``lcl``: priority = the lossy coding length per parameter of the layer's weight (rows = output channels;
  our reading: the weights are always available and need no calibration pass).
- ``sensitivity``: priority = −(output SQNR in dB of the layer quantized with its cheapest candidate, RTN, on
  the calibration batches): the layers that suffer most get bits first.

Costs are the exact packed sizes (codes, scales, tensor scale) of each layer in each candidate. The decision
is written into the recipe as per-layer ``weights`` overrides (so ``recipe.yaml`` replays it) and into the
plans and report entries.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from numcast.algorithms.mixed_precision import LayerChoice, allocate, layer_coding_length
from numcast.algorithms.rtn import rtn
from numcast.formats.qtensor import storage_nbytes
from numcast.formats.registry import get_format
from numcast.nn.observe import call_model
from numcast.pipeline.recipe import LayerOverride, Recipe

_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def budget_bits(text: str, params: int) -> float:
    """Total bits allowed for ``params`` quantized weights: ``"4.5bits"`` (average bits per parameter, scales
    included) or a size in bytes (``"250000"``, ``"250kB"``, ``"1.5MiB"``)."""
    t = text.strip().lower().replace(" ", "")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)(bits?|bpp)", t)
    if m:
        return float(m.group(1)) * params
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)([kmg]i?b|b)?", t)
    if not m:
        raise ValueError(f"budget {text!r}: give average bits per parameter ('4.5bits') or bytes ('250kB')")
    return float(m.group(1)) * _UNITS[m.group(2) or "b"] * 8


def _view_shape(module: nn.Module) -> tuple[int, int]:
    w = module.weight
    return (w.shape[0], w[0].numel())


@torch.no_grad()
def _sensitivities(model: nn.Module, plans: list, fmts: dict[str, str], batches: list) -> dict[str, float]:
    """Output SQNR (dB) of each planned layer with its weight in ``fmts[name]`` (RTN), on the calibration
    batches: the layer is run a second time with the quantized weight inside its own forward hook."""
    sums = {p.name: [0.0, 0.0] for p in plans}
    quant = {p.name: rtn(p.module.weight, fmts[p.name]).dequantize().reshape(p.module.weight.shape) for p in plans}
    busy = set()
    handles = []
    for p in plans:

        def hook(mod, args, out, name=p.name):
            if name in busy:
                return
            busy.add(name)
            orig = mod.weight.data
            mod.weight.data = quant[name].to(orig.dtype)
            try:
                q_out = mod(*args)
            finally:
                mod.weight.data = orig
                busy.discard(name)
            ref = out[0] if isinstance(out, tuple) else out
            q_out = q_out[0] if isinstance(q_out, tuple) else q_out
            sums[name][0] += float(ref.double().square().sum())
            sums[name][1] += float((ref.double() - q_out.double()).square().sum())

        handles.append(p.module.register_forward_hook(hook))
    try:
        for b in batches:
            call_model(model, b)
    finally:
        for h in handles:
            h.remove()
    return {n: (10 * math.log10(s / e) if e > 0 and s > 0 else math.inf) for n, (s, e) in sums.items()}


def resolve_mixed_precision(model: nn.Module, plans: list, report: list, recipe: Recipe, batches: list) -> Recipe:
    """A copy of ``recipe`` with one ``weights`` override per planned layer (see module docstring); ``plans``
    and ``report`` entries are updated. ``recipe`` itself is not modified."""
    mp = recipe.mixed_precision
    if mp.strategy is None:
        return recipe
    if not plans:
        raise ValueError("mixed precision: no layer to quantize")
    params = sum(math.prod(_view_shape(p.module)) for p in plans)
    total = budget_bits(mp.budget, params)
    per_layer: dict[str, list[tuple[float, str]]] = {}
    for p in plans:
        shape = _view_shape(p.module)
        costs = sorted({(8.0 * storage_nbytes(shape, get_format(c)), c) for c in mp.candidates})
        per_layer[p.name] = [costs[0]] + [c for a, c in zip(costs, costs[1:], strict=False) if c[0] > a[0]]
    if mp.strategy == "lcl":
        prio = {p.name: layer_coding_length(p.module.weight, mp.eps) for p in plans}
    else:
        if not batches:
            raise ValueError("mixed precision by sensitivity needs calibration batches")
        sqnr = _sensitivities(model, plans, {n: c[0][1] for n, c in per_layer.items()}, batches)
        prio = {n: -v for n, v in sqnr.items()}
    layers = [LayerChoice(n, tuple(c for c, _ in per_layer[n]), prio[n]) for n in per_layer]
    choice = allocate(layers, total)
    entry = {r.name: r for r in report}
    extra = []
    for p in plans:
        fmt = per_layer[p.name][choice[p.name]][1]
        p.weight_format = fmt
        entry[p.name].weight_format = fmt
        extra.append(LayerOverride(pattern=p.name, weights=fmt))
    resolved = recipe.with_overrides(extra)
    resolved.mixed_precision.strategy = None  # decided: the saved recipe replays these formats as they are
    return resolved
