"""EP-init and the A2Q / A2Q+ weight map, as tensor functions (papers.md §3).

- :func:`project_l1_ball`: the Euclidean projection of every row onto an L1 ball of its own radius (Duchi,
  Shalev-Shwartz, Singer, Chandra 2008, Fig. 1: sort |v|, cumulative sums, soft threshold θ), vectorised over
  rows.
- :func:`a2q_integer_weights`: the A2Q / A2Q+ quantizer's map from (direction v, norm g, scale s) to integer
  weights (A2Q §3.2 Eq. 14–16, A2Q+ §3.2): v is zero-centred per row (A2Q+ only; the mean is not added back),
  normalised to L1 norm min(g/s, T) in integer units, rounded **toward zero** and clipped to ±(2^(M−1) − 1).
  Rounding toward zero never increases a magnitude, so ‖q‖₁ ≤ T (A2Q) and Σq⁺, Σ|q⁻| ≤ T/2 (A2Q+) hold for
  any v, g and s: that is the guarantee (round-to-nearest breaks it, tested).
- :func:`ep_init`: A2Q+'s Euclidean-projection initialisation (A2Q+ §3.3) — per channel s = max|w|/(2^(M−1) − 1),
  g = min(‖w‖₁, s·T), v = the projection of w onto the L1 ball of radius s·T. Our reading follows Brevitas'
  ``apply_ep_init``: the raw (not zero-centred) weights are projected, g is clamped before; with A2Q the
  result is then exactly round-toward-zero of v/s.
- :func:`fit_budget`: PTQ under the budget (numcast's; the papers train after EP-init). Real values in integer
  units — float weights / s for the ``ep-init`` method, a solver's integer codes for RTN, GPTQ and Error
  Diffusion, so every PTQ method can carry the guarantee — are projected onto the budget set and rounded
  within it. Two readings differ from the QAT quantizer, on purpose and measured (README): A2Q+'s budget is
  enforced on the two halves (Σq⁺ ≤ T/2, Σ|q⁻| ≤ T/2: the condition its bound rests on) instead of by
  zero-centring, which without retraining changes the layer's function (the A2Q+ QAT model right after EP-init
  scores 10–13 % top-1 on Fashion-MNIST, ``benchmarks/accumulator.py``); and rounding is
  :func:`round_within_budget` by default (round toward zero: 91.1 % → 64.8 % with ``numcast quantize fmnist-cnn
  --weights int4_channel --activations int8 --method ep-init --accumulator-bits 24 --accumulator-rule a2q
  --accumulator-rounding toward_zero``, a budget that binds no layer).
  numcast's extension (not in the papers): every PTQ method can carry the accumulator guarantee.

Shapes: weights are ``[out, K]`` (conv weights viewed as ``[out, in/groups·Πk]``); per-channel tensors ``[out]``.
All arithmetic that decides an integer is done in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from numcast.accumulator.bounds import a2q_l1_bound, a2q_plus_l1_bound

A2QRule = Literal["a2q", "a2q+"]
A2Q_RULES = ("a2q", "a2q+")


def l1_budget(rule: A2QRule, accumulator_bits: int, input_bits: int, input_signed: bool) -> float:
    """T, the per-channel L1 budget on the integer weights: :func:`a2q_l1_bound` or :func:`a2q_plus_l1_bound`."""
    if rule == "a2q":
        return a2q_l1_bound(accumulator_bits, input_bits, input_signed)
    if rule == "a2q+":
        return a2q_plus_l1_bound(accumulator_bits, input_bits)
    raise ValueError(f"unknown accumulator-aware rule {rule!r}; one of {A2Q_RULES}")


def project_l1_ball(v: torch.Tensor, radius: torch.Tensor | float) -> torch.Tensor:
    """Rows of ``v`` ``[R, K]`` projected onto {u : ‖u‖₁ ≤ radius_r} (Euclidean; rows inside stay unchanged).

    ``radius``: a scalar or ``[R]``, ≥ 0. Returns a tensor of ``v``'s dtype (computed in float64)."""
    if v.dim() != 2:
        raise ValueError(f"project_l1_ball takes [rows, K], got shape {tuple(v.shape)}")
    if not bool(torch.isfinite(v).all()):
        raise ValueError("project_l1_ball: the weights contain NaN or Inf")
    x = v.double()
    z = torch.as_tensor(radius, dtype=torch.float64, device=v.device).expand(x.shape[0]).clone()
    if bool((z < 0).any()) or not bool(torch.isfinite(z).all()):
        raise ValueError("project_l1_ball: radii must be finite and >= 0")
    a = x.abs()
    u = a.sort(dim=1, descending=True).values
    c = u.cumsum(1)
    j = torch.arange(1, x.shape[1] + 1, dtype=torch.float64, device=v.device)
    active = u * j > c - z[:, None]  # Duchi et al.: u_j > (c_j − z)/j; true for a prefix of j
    rho = active.sum(1).clamp(min=1)
    theta = ((c.gather(1, (rho - 1)[:, None]).squeeze(1) - z) / rho).clamp(min=0)
    out = torch.sign(x) * (a - theta[:, None]).clamp(min=0)
    inside = a.sum(1) <= z
    return torch.where(inside[:, None], x, out).to(v.dtype)


def _rtz_ste(x: torch.Tensor) -> torch.Tensor:
    """Round toward zero with a straight-through gradient."""
    return x + (torch.trunc(x) - x).detach()


def a2q_integer_weights(
    v: torch.Tensor, g: torch.Tensor, s: torch.Tensor, budget: float, weight_bits: int, zero_center: bool
) -> torch.Tensor:
    """The A2Q (``zero_center=False``) / A2Q+ (``True``) map to integer weights ``[out, K]`` (float64 integers;
    differentiable in v, g, s through a straight-through round-toward-zero).

    ``v`` ``[out, K]`` direction, ``g`` ``[out]`` L1 norm (> 0, real units), ``s`` ``[out]`` scale (> 0),
    ``budget`` T. q = clip(trunc(v̄·min(g/s, T)/‖v̄‖₁), ±(2^(M−1) − 1)), v̄ = v − mean(v) for A2Q+ else v."""
    if weight_bits < 2:
        raise ValueError(f"A2Q needs signed weights of >= 2 bits, got {weight_bits}")
    x = v.double()
    if zero_center:
        x = x - x.mean(1, keepdim=True)
    norm = x.abs().sum(1, keepdim=True)
    gain = torch.minimum(g.double() / s.double(), torch.full_like(g, budget, dtype=torch.float64))
    y = x * (gain[:, None] / norm.clamp(min=torch.finfo(torch.float64).tiny))
    qmax = float((1 << (weight_bits - 1)) - 1)
    return _rtz_ste(y).clamp(-qmax, qmax)


@dataclass(frozen=True)
class A2QInit:
    """EP-init's per-channel parameters: direction ``v`` ``[out, K]``, norm ``g`` ``[out]``, scale ``s`` ``[out]``."""

    v: torch.Tensor
    g: torch.Tensor
    s: torch.Tensor


def initial_scale(w: torch.Tensor, weight_bits: int) -> torch.Tensor:
    """s = max|w_row|/(2^(M−1) − 1) per row (in ``w``'s dtype), the absmax scale A2Q initialises with; 1 for
    zero rows."""
    s = w.abs().amax(1) / ((1 << (weight_bits - 1)) - 1)
    return torch.where(s > 0, s, torch.ones_like(s))


def ep_init(w: torch.Tensor, weight_bits: int, budget: float, scale: torch.Tensor | None = None) -> A2QInit:
    """EP-init for weights ``w`` ``[out, K]``: radius s·T per channel (``scale`` s, default :func:`initial_scale`)."""
    if not bool(torch.isfinite(w).all()):
        raise ValueError("ep_init: the weights contain NaN or Inf")
    s = (initial_scale(w, weight_bits) if scale is None else scale).double()
    radius = s * budget
    g = torch.minimum(w.double().abs().sum(1), radius)
    return A2QInit(project_l1_ball(w.double(), radius), g, s)


def project_budget(v: torch.Tensor, budget: torch.Tensor | float, split: bool) -> torch.Tensor:
    """Euclidean projection of rows ``[R, K]`` onto the accumulator budget: the L1 ball of radius ``budget``
    (A2Q), or with ``split`` the set {Σv⁺ ≤ budget/2, Σ|v⁻| ≤ budget/2} (the condition A2Q+'s bound rests on;
    positive and negative entries decouple, each half is an L1-ball projection of its own)."""
    if not split:
        return project_l1_ball(v, budget)
    half = torch.as_tensor(budget, dtype=torch.float64) / 2
    return project_l1_ball(v.clamp(min=0), half) + project_l1_ball(v.clamp(max=0), half)


def round_within_budget(y: torch.Tensor, budget: float, weight_bits: int, split: bool) -> torch.Tensor:
    """Integers ``[R, K]`` (float64) for real values ``y`` (integer units) within the budget: round toward zero,
    then round away from zero — as round-to-nearest would — the entries with the largest fractional parts
    (≥ 0.5) while the row's budget (or, with ``split``, the half budget of that sign) allows. Equals
    round-to-nearest whenever that meets the budget; never leaves it (numcast's PTQ rounding; the papers use
    round toward zero, which loses about a quarter step per weight on average)."""
    qmax = float((1 << (weight_bits - 1)) - 1)
    y = y.double().clamp(-qmax, qmax)
    q = torch.trunc(y)
    frac = (y - q).abs()
    cand = (frac >= 0.5) & (q.abs() < qmax)
    groups = [(torch.ones_like(cand), budget)] if not split else [(y > 0, budget / 2), (y < 0, budget / 2)]
    for member, limit in groups:
        used = (q.abs() * member).sum(1)
        allowance = torch.floor(limit - used).clamp(min=0)  # whole steps left in this row (or half)
        key = torch.where(cand & member, frac, torch.full_like(frac, -1.0))
        order = key.argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(y.shape[1], device=y.device).expand_as(order))
        up = (key >= 0) & (rank < allowance[:, None])
        q = q + torch.sign(y) * up
    return q


BUDGET_ROUNDINGS = ("budget", "toward_zero")


def fit_budget(
    y: torch.Tensor, weight_bits: int, budget: float, rule: A2QRule, rounding: str = "budget"
) -> torch.Tensor:
    """PTQ under an accumulator budget: integer weights ``[out, K]`` (float64) for real values ``y`` in integer
    units (float weights / scale for EP-init; a solver's integer codes for RTN/GPTQ/ED), projected onto the
    budget (:func:`project_budget`; ``a2q+`` as the split halves, *not* zero-centred: without retraining the
    removed mean changes the layer's function) and rounded (``budget``: :func:`round_within_budget`;
    ``toward_zero``: the papers' rounding). Rows already within the budget keep integer codes unchanged."""
    if rule not in A2Q_RULES:
        raise ValueError(f"unknown accumulator-aware rule {rule!r}; one of {A2Q_RULES}")
    if rounding not in BUDGET_ROUNDINGS:
        raise ValueError(f"unknown budget rounding {rounding!r}; one of {BUDGET_ROUNDINGS}")
    if not bool(torch.isfinite(y).all()):
        raise ValueError("fit_budget: the weights contain NaN or Inf")
    split = rule == "a2q+"
    v = project_budget(y.double(), budget, split)
    if rounding == "toward_zero":
        qmax = float((1 << (weight_bits - 1)) - 1)
        return torch.trunc(v).clamp(-qmax, qmax)
    return round_within_budget(v, budget, weight_bits, split)
