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
- :func:`constrain_codes`: the same map applied to integer weights already on a per-channel grid (the result
  of RTN, GPTQ or Error Diffusion), in integer units: project onto the budget T and round toward zero; the
  scales stay.
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
    """s = max|w_row|/(2^(M−1) − 1) per row (float64), the absmax scale A2Q initialises with; 1 for zero rows."""
    s = w.double().abs().amax(1) / ((1 << (weight_bits - 1)) - 1)
    return torch.where(s > 0, s, torch.ones_like(s))


def ep_init(w: torch.Tensor, weight_bits: int, budget: float, scale: torch.Tensor | None = None) -> A2QInit:
    """EP-init for weights ``w`` ``[out, K]``: radius s·T per channel (``scale`` s, default :func:`initial_scale`)."""
    if not bool(torch.isfinite(w).all()):
        raise ValueError("ep_init: the weights contain NaN or Inf")
    s = initial_scale(w, weight_bits) if scale is None else scale.double()
    radius = s * budget
    g = torch.minimum(w.double().abs().sum(1), radius)
    return A2QInit(project_l1_ball(w.double(), radius), g, s)


def constrain_codes(q: torch.Tensor, weight_bits: int, budget: float, zero_center: bool) -> torch.Tensor:
    """Integer weights ``[out, K]`` (float64) that meet the budget, from integer weights ``q`` (codes on a
    per-channel grid: the result of RTN, GPTQ or Error Diffusion; the scales stay as they are). EP-init in
    integer units (s = 1: projection onto radius T, g = min(‖q‖₁, T)) followed by the A2Q/A2Q+ map. Rows
    already within the budget are returned unchanged by A2Q (the gain is exactly 1); A2Q+ re-centres them."""
    qd = q.double()
    if not bool((qd == qd.round()).all()):
        raise ValueError("constrain_codes takes integer codes")
    init = ep_init(qd, weight_bits, budget, torch.ones(qd.shape[0], dtype=torch.float64, device=q.device))
    g = torch.where(init.g > 0, init.g, torch.ones_like(init.g))  # an all-zero row stays zero (v = 0)
    return a2q_integer_weights(init.v, g, init.s, budget, weight_bits, zero_center).detach()
