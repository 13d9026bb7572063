"""Mixed precision in the pipeline: which candidate weight format each layer gets under a size budget, decided
before any layer is quantized (:mod:`numcast.algorithms.mixed_precision`).

- Every candidate of every layer is measured first, in one pass over the calibration batches on the float
  model's inputs: the noise Σ‖y − ŷ_c‖² of the layer's output with its weight in candidate c (RTN).
- ``sensitivity`` (the baseline): distortion of layer l in candidate c = its relative output noise
  r_l(c) = Σ‖y − ŷ_c‖²/Σ‖y‖², i.e. 10^(−SQNR/10).
- ``lcl`` (our reading of the paper's lossy-coding-length allocation, papers.md §4): distortion =
  w_l · r_l(c), w_l the lossy coding length of the layer's float output vectors (one per position of a
  convolution, one per token of a Linear; Gram matrix accumulated over the calibration set) at relative
  distortion ``eps`` (default 0.1, a 20 dB reference), per vector and output coordinate (L/(n·D)), divided
  by its mean over the layers. Layers whose outputs carry more information per coordinate pay more for
  the same relative noise, so they get more bits; the noise model keeps the allocation from trading a
  layer's bits blind. Choices tried first and dropped (Fashion-MNIST, MobileNetV2; scratch runs, not
  committed benchmarks): the coding length per parameter of the *weights* as w_l (it grows with the row
  length and pinned the allocation to uniform precision); the coding length of the outputs at each
  candidate's own distortion as the objective (a log-distortion that puts layers at 2 or 8 bits and lost
  to uniform on MobileNetV2); a ranking by coding length with no noise model (round robin or highest
  first: uniform precision, or layers starved at 2 bits).
- :func:`numcast.algorithms.mixed_precision.allocate` then minimises Σ distortion exactly under the budget.

Costs are the exact packed sizes (codes, scales, tensor scale) of each layer in each candidate. The decision
goes into the plans (:mod:`numcast.pipeline.plan` turns it into per-layer ``weights`` overrides of the saved
recipe, so ``recipe.yaml`` replays it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from numcast.algorithms.mixed_precision import FeatureGram, LayerChoice, allocate
from numcast.algorithms.rtn import rtn
from numcast.formats.qtensor import storage_nbytes
from numcast.formats.registry import get_format
from numcast.nn.observe import call_model
from numcast.pipeline.padding import real_tokens, token_mask
from numcast.pipeline.settings import MixedPrecisionSettings, budget_bits


def _view_shape(module: nn.Module) -> tuple[int, int]:
    w = module.weight
    return (w.shape[0], w[0].numel())


def _feature_rows(y: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """A layer output as feature vectors ``[m, C]``: one per position for a convolution (channels at dim 1),
    one per token for a Linear (features last)."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and y.dim() > 2:
        y = y.movedim(1, -1)
    return y.reshape(-1, y.shape[-1])


@dataclass
class LayerMeasure:
    """One layer on the calibration batches (float model's inputs): Σ‖y‖² of its float output, Σ‖y − ŷ_c‖² with
    its weight in each candidate c (RTN), and (``lcl``) the statistics of its float output vectors."""

    signal: float = 0.0
    noise: dict[str, float] = field(default_factory=dict)
    features: FeatureGram | None = None

    def relative_noise(self, c: str) -> float:
        return self.noise[c] / self.signal if self.signal > 0 else 0.0

    def information(self, eps: float) -> float:
        """Coding length per output coordinate (bits; L / (n·D)) of the layer's float output vectors at relative
        distortion ``eps``: ε² = eps² · Σ‖y‖²/n per vector, so only directions that carry more than about
        eps²/D of the energy count (0 for a layer whose outputs are all zero). Intensive: it does not grow
        with the layer's width or the number of vectors."""
        f = self.features
        if self.signal <= 0:
            return 0.0
        d = f.gram.shape[0]
        return f.coding_length(eps * math.sqrt(self.signal / f.n)) / (f.n * d)


@torch.no_grad()
def measure_layers(model: nn.Module, plans: list, candidates: list[str], batches: list,
                   features: bool = False) -> dict[str, LayerMeasure]:  # fmt: skip
    """:class:`LayerMeasure` of every planned layer in one pass over the calibration batches: inside each
    layer's forward hook the layer is run again once per candidate with its RTN weight. Padding tokens (a batch's
    ``attention_mask``) are left out of the sums (:mod:`numcast.pipeline.padding`)."""
    got = {p.name: LayerMeasure(noise=dict.fromkeys(candidates, 0.0), features=FeatureGram() if features else None)
           for p in plans}  # fmt: skip
    quant = {
        p.name: {c: rtn(p.module.weight, c).dequantize().reshape(p.module.weight.shape) for c in candidates}
        for p in plans
    }
    busy = set()
    handles = []
    mask: list[torch.Tensor | None] = [None]  # the current batch's real tokens
    for p in plans:

        def hook(mod, args, out, name=p.name):
            if name in busy:
                return
            busy.add(name)
            ref = real_tokens((out[0] if isinstance(out, tuple) else out).double(), mask[0])
            m = got[name]
            m.signal += float(ref.square().sum())
            if m.features is not None:
                m.features.add(_feature_rows(ref, mod))
            orig = mod.weight.data
            try:
                for c, wq in quant[name].items():
                    mod.weight.data = wq.to(orig.dtype)
                    q_out = mod(*args)
                    q_out = q_out[0] if isinstance(q_out, tuple) else q_out
                    m.noise[c] += float((ref - real_tokens(q_out.double(), mask[0])).square().sum())
            finally:
                mod.weight.data = orig
                busy.discard(name)

        handles.append(p.module.register_forward_hook(hook))
    try:
        for b in batches:
            mask[0] = token_mask(b)
            call_model(model, b)
    finally:
        for h in handles:
            h.remove()
    return got


def layer_distortions(model: nn.Module, plans: list, candidates: list[str], strategy: str, eps: float,
                      batches: list) -> dict[str, dict[str, float]]:  # fmt: skip
    """{layer: {candidate: distortion}} for the allocator (module docstring)."""
    if not batches:
        raise ValueError(f"mixed precision by {strategy} needs calibration batches")
    got = measure_layers(model, plans, candidates, batches, features=strategy == "lcl")
    if strategy == "sensitivity":
        return {n: {c: m.relative_noise(c) for c in candidates} for n, m in got.items()}
    info = {n: m.information(eps) for n, m in got.items()}
    mean = sum(info.values()) / len(info) or 1.0
    return {n: {c: info[n] / mean * m.relative_noise(c) for c in candidates} for n, m in got.items()}


def resolve_mixed_precision(model: nn.Module, plans: list, settings: MixedPrecisionSettings, batches: list) -> None:
    """Set every plan's ``weight_format`` to the candidate the allocation picks (see module docstring)."""
    if not plans:
        raise ValueError("mixed precision: no layer to quantize")
    params = sum(math.prod(_view_shape(p.module)) for p in plans)
    total = budget_bits(settings.budget, params)
    # the same refusal as allocate()'s, before the calibration pass that measures every candidate
    cheapest = sum(min(8.0 * storage_nbytes(_view_shape(p.module), get_format(c)) for c in settings.candidates)
                   for p in plans)  # fmt: skip
    if cheapest > total:
        raise ValueError(f"the budget ({total:.0f} bits) is below the cheapest assignment ({cheapest:.0f} bits)")
    candidates = list(dict.fromkeys(settings.candidates))
    dist = layer_distortions(model, plans, candidates, settings.strategy, settings.eps, batches)
    per_layer: dict[str, list[tuple[float, float, str]]] = {}
    for p in plans:
        shape = _view_shape(p.module)
        ranked = sorted((8.0 * storage_nbytes(shape, get_format(c)), dist[p.name][c], c) for c in dist[p.name])
        # of candidates that cost the same here, the one with the least distortion
        per_layer[p.name] = [ranked[0]] + [c for a, c in zip(ranked, ranked[1:], strict=False) if c[0] > a[0]]
    layers = [LayerChoice(n, tuple(c for c, _, _ in v), tuple(d for _, d, _ in v)) for n, v in per_layer.items()]
    choice = allocate(layers, total)
    for p in plans:
        p.weight_format = per_layer[p.name][choice[p.name]][2]
