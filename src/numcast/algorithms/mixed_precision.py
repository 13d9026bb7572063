"""Mixed precision by lossy coding length (papers.md §4; Attention Round, arXiv 2207.03088 §3.3, after Ma,
Derksen, Hong, Wright, "Segmentation of multivariate mixed data via lossy data coding and compression",
TPAMI 2007, Eq. 4).

- :func:`coding_length`: the bits needed to code n vectors of R^D (the rows of ``Z`` ``[n, D]``, mean
  removed) up to distortion ε: L = (n + D)/2 · log2 det(I + D/(ε² n) · Z̄ᵀZ̄). By Sylvester's identity the
  determinant is taken on the smaller of the two Gram matrices (n×n or D×D), via a Cholesky factorisation in
  float64 (log det = 2 Σ log diag).
- :class:`FeatureGram`, :func:`coding_length_spectrum`: the same L from the eigenvalues of the mean-removed
  Gram matrix of feature vectors accumulated batch by batch (a layer's outputs over the calibration set:
  n is the number of vectors, so they are never held at once).
- :func:`allocate`: one candidate format per layer under a total size budget, as the multiple-choice
  knapsack min Σ_l d_l(c_l) s.t. Σ_l cost_l(c_l) ≤ budget, solved exactly as a binary program (HiGHS via
  ``scipy.optimize.milp``; a few hundred binaries for a hundred layers), then any budget the optimum leaves
  is filled with the steps up that lower distortion most per bit, so what is left is smaller than every
  step up that would help (tested against brute force, and never above the budget).
  The distortions are the pipeline's (:mod:`numcast.pipeline.mixed_precision`: the relative output noise
  of each candidate, weighted by the layer's coding length for ``lcl``); of two layers with the same size
  and noise curve, the one with the larger weight never gets fewer bits (tested).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, milp


def _check_eps(eps: float) -> None:
    if not eps > 0 or not math.isfinite(eps):
        raise ValueError(f"the distortion eps must be a positive number, got {eps!r}")


def coding_length(z: torch.Tensor, eps: float) -> float:
    """L(Z) in bits for the rows of ``z`` ``[n, D]`` (mean removed first) at distortion ``eps`` > 0."""
    if z.dim() != 2 or z.shape[0] < 1 or z.shape[1] < 1:
        raise ValueError(f"coding_length takes a non-empty [n, D] matrix, got shape {tuple(z.shape)}")
    _check_eps(eps)
    if not bool(torch.isfinite(z).all()):
        raise ValueError("coding_length: the matrix contains NaN or Inf")
    x = z.double()
    x = x - x.mean(0, keepdim=True)
    n, d = x.shape
    gram = x @ x.T if n <= d else x.T @ x
    a = torch.eye(gram.shape[0], dtype=torch.float64) + (d / (eps * eps * n)) * gram
    chol = torch.linalg.cholesky(a)
    logdet = 2.0 * torch.log(torch.diagonal(chol)).sum()
    return float((n + d) / 2.0 * logdet / math.log(2.0))


def coding_length_spectrum(eigenvalues: torch.Tensor, n: int, d: int, eps: float) -> float:
    """L in bits from the eigenvalues of the mean-removed Gram matrix Z̄ᵀZ̄ of n vectors of R^d:
    (n + d)/2 · Σ_i log2(1 + d/(ε² n) · λ_i) (the same determinant, diagonalised)."""
    _check_eps(eps)
    lam = eigenvalues.double().clamp(min=0)
    return float((n + d) / 2.0 * torch.log1p(d / (eps * eps * n) * lam).sum() / math.log(2.0))


class FeatureGram:
    """Running statistics of feature vectors (rows ``[m, D]``, added batch by batch, float64): their count,
    sum and Gram matrix, so the coding length of all of them is available without keeping them
    (D×D memory)."""

    def __init__(self) -> None:
        self.n = 0
        self.total: torch.Tensor | None = None
        self.gram: torch.Tensor | None = None

    def add(self, rows: torch.Tensor) -> None:
        x = rows.detach().reshape(-1, rows.shape[-1]).double()
        if self.gram is None:
            self.total, self.gram = x.sum(0), x.T @ x
        else:
            self.total += x.sum(0)
            self.gram += x.T @ x
        self.n += x.shape[0]

    def spectrum(self) -> torch.Tensor:
        """Eigenvalues of the mean-removed Gram matrix Z̄ᵀZ̄ = ZᵀZ − n·z̄z̄ᵀ (ascending)."""
        if self.gram is None or self.n == 0:
            raise ValueError("no feature vectors were added")
        centred = self.gram - torch.outer(self.total, self.total) / self.n
        return torch.linalg.eigvalsh((centred + centred.T) / 2)

    def coding_length(self, eps: float) -> float:
        return coding_length_spectrum(self.spectrum(), self.n, self.gram.shape[0], eps)


@dataclass(frozen=True)
class LayerChoice:
    """A layer's candidates, cheapest first: ``costs[i]`` its size in bits in candidate i (strictly increasing),
    ``distortions[i]`` the loss it is expected to add in candidate i (non-negative, in one unit shared by all
    the layers of an allocation)."""

    name: str
    costs: tuple[float, ...]
    distortions: tuple[float, ...]


def _check(layers: list[LayerChoice]) -> None:
    for lay in layers:
        if not lay.costs or any(b <= a for a, b in zip(lay.costs, lay.costs[1:], strict=False)):
            raise ValueError(f"{lay.name}: candidate costs must be non-empty and strictly increasing, got {lay.costs}")
        if len(lay.distortions) != len(lay.costs) or not all(math.isfinite(d) and d >= 0 for d in lay.distortions):
            raise ValueError(f"{lay.name}: one finite, non-negative distortion per candidate, got {lay.distortions}")


@contextlib.contextmanager
def _quiet_stdout():
    """Send what C code writes to file descriptor 1 to /dev/null for the duration (Python's own output is
    flushed first and is unaffected afterwards). The solver's verdict comes back in its result, not there."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _solve_knapsack(layers: list[LayerChoice], budget_bits: float) -> list[int]:
    """argmin Σ distortion subject to Σ cost ≤ budget, one candidate per layer: a binary program (HiGHS through
    ``scipy.optimize.milp``), costs in units of the budget and distortions of the largest, so both are O(1)."""
    sizes = [len(lay.costs) for lay in layers]
    starts = np.cumsum([0] + sizes[:-1])
    cost = np.concatenate([np.asarray(lay.costs, np.float64) for lay in layers]) / budget_bits
    dist = np.concatenate([np.asarray(lay.distortions, np.float64) for lay in layers])
    dist = dist / dist.max() if dist.max() > 0 else dist
    one_each = np.zeros((len(layers), cost.size))
    for row, (s, k) in enumerate(zip(starts, sizes, strict=True)):
        one_each[row, s : s + k] = 1.0
    with _quiet_stdout():  # HiGHS 1.12 prints a stray debug line even when silent (ERGO-Code/HiGHS#2783)
        res = milp(dist, integrality=np.ones(cost.size), bounds=Bounds(0, 1),
                   constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(cost[None], -np.inf, 1.0)],
                   options={"mip_rel_gap": 1e-9})  # fmt: skip
    if res.x is None:
        raise RuntimeError(f"the mixed-precision program found no solution: {res.message}")
    return [int(np.argmax(res.x[s : s + k])) for s, k in zip(starts, sizes, strict=True)]


def _step_gain(lay: LayerChoice, i: int, up: bool) -> float:
    """Distortion change per bit of moving ``lay`` from candidate i one step up (or down)."""
    j = i + 1 if up else i - 1
    return (lay.distortions[j] - lay.distortions[i]) / (lay.costs[j] - lay.costs[i])


def allocate(layers: list[LayerChoice], budget_bits: float) -> dict[str, int]:
    """Candidate index per layer name: the least total distortion whose total cost is within ``budget_bits``
    (see module docstring); what is left is then smaller than every next step up that would not raise a layer's
    distortion.

    ``ValueError`` when even the cheapest candidates exceed the budget, when a layer's costs do not increase or
    its distortions are not finite and non-negative."""
    _check(layers)
    cheapest = sum(lay.costs[0] for lay in layers)
    if cheapest > budget_bits:
        raise ValueError(f"the budget ({budget_bits:.0f} bits) is below the cheapest assignment ({cheapest:.0f} bits)")
    if not layers:
        return {}
    idx = _solve_knapsack(layers, budget_bits)
    used = sum(lay.costs[i] for lay, i in zip(layers, idx, strict=True))
    while used > budget_bits:  # within the solver's tolerance only: step down where that costs least per bit
        j = min((j for j, i in enumerate(idx) if i > 0), key=lambda j: (-_step_gain(layers[j], idx[j], False), j))
        used -= layers[j].costs[idx[j]] - layers[j].costs[idx[j] - 1]
        idx[j] -= 1
    while True:  # what is left: the step up that lowers distortion most per bit, while one fits
        fits = [(_step_gain(lay, i, True), j) for j, (lay, i) in enumerate(zip(layers, idx, strict=True))
                if i + 1 < len(lay.costs) and used + lay.costs[i + 1] - lay.costs[i] <= budget_bits
                and lay.distortions[i + 1] <= lay.distortions[i]]  # fmt: skip
        if not fits:
            break
        _, j = min(fits)
        used += layers[j].costs[idx[j] + 1] - layers[j].costs[idx[j]]
        idx[j] += 1
    return {lay.name: i for lay, i in zip(layers, idx, strict=True)}
