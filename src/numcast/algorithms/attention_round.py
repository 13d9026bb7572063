"""Attention Round (papers.md §4; Diao, Li, Xu, Hao, arXiv 2207.03088 §3.2) for any numcast format.

**[reconstruction]** — the paper's text fixes the idea, not every formula; our reading:

- Every weight w (element units u = w/s, s its fixed scale: per channel, per group, per block, NVFP4's
  two-level product) may map to *any* level g of its format's element grid (all finite representable values;
  the whole grid of a minifloat, not only the two neighbours of u). The attention of w on level g is
  p_g = softmax_g(−d_g²/(2σ²)), d_g = (u + δ − g)/Δ, with δ a learned offset per weight and Δ the local grid
  step around u (the spacing of u's two neighbouring levels), so σ is measured in grid steps on the
  non-uniform minifloat grids as on the integer ones.
- ``variant="soft"`` (expectation): the forward uses ū = Σ_g p_g·g. ``variant="sampled"``: the forward uses a
  level drawn ∝ p (seeded generator), the backward the expectation's gradient (straight-through).
- δ minimises ``loss(ŵ)`` (e.g. a layer's output error through its input Gram matrix, or a block's output
  reconstruction error) with Adam while σ anneals geometrically from ``sigma_start`` to ``sigma_end``; the
  result is the hard level argmax_g p_g at the end (the nearest level to u + δ), so it is an exact member of
  the format with the same scales (returned as a QTensor).
- ``k_nearest``: only the K levels nearest to u carry attention (the full grid when K covers it; tested equal).

Shapes: ``weight`` ``[out, K]`` (blocks along the last axis, as everywhere in numcast). Deterministic: the
only randomness is the sampled variant's, from ``seed``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from numcast.formats.element import decode_table
from numcast.formats.ops import core
from numcast.formats.qtensor import QTensor
from numcast.formats.registry import FormatLike, get_format

VARIANTS = ("soft", "sampled")


@dataclass
class ARResult:
    qtensor: QTensor
    weight: torch.Tensor  # [out, K] the hard quantized weight (== qtensor.dequantize())
    offsets: torch.Tensor  # δ [out, K], element units
    losses: list[float]
    iterations: int


def element_grid(fmt) -> torch.Tensor:
    """The sorted finite values of the format's element (float64, element units)."""
    vals = decode_table(fmt.element, torch.float64)
    return torch.unique(vals[torch.isfinite(vals)])


def _scales(w: torch.Tensor, fmt) -> tuple[torch.Tensor, object]:
    r = core(w, fmt)
    if r.scales.scale is None:
        return torch.ones_like(w, dtype=torch.float64), r
    eff = r.scales.effective().double()
    per_elem = r.rows_to_tensor(eff[:, None].expand(r.values.shape).to(r.values.dtype), w.shape).double()
    return per_elem, r


def _nearest_levels(u: torch.Tensor, grid: torch.Tensor, k: int) -> torch.Tensor:
    """The k levels of the sorted ``grid`` nearest to each u, ascending ``[..., k]``. They are contiguous in the
    grid and lie within the 2k levels around u's position, so only that window is searched."""
    n = grid.numel()
    if n <= 2 * k:
        window = grid.expand(*u.shape, n)
    else:
        pos = torch.searchsorted(grid, u.contiguous())
        start = (pos - k).clamp(0, n - 2 * k)
        window = grid[start[..., None] + torch.arange(2 * k)]
    idx = (u[..., None] - window).abs().topk(k, dim=-1, largest=False).indices.sort(-1).values
    return window.gather(-1, idx)


def attention_round(
    weight: torch.Tensor,
    fmt: FormatLike,
    loss: Callable[[torch.Tensor], torch.Tensor],
    *,
    iterations: int = 500,
    lr: float = 5e-2,
    sigma_start: float = 0.5,
    sigma_end: float = 0.01,
    k_nearest: int | None = 8,
    variant: str = "soft",
    seed: int = 0,
    time_budget_s: float | None = None,
) -> ARResult:
    """Attention Round of ``weight`` ``[out, K]`` to ``fmt`` minimising ``loss(ŵ)`` (ŵ float32 ``[out, K]``)."""
    fmt = get_format(fmt)
    if variant not in VARIANTS:
        raise ValueError(f"unknown Attention Round variant {variant!r}; one of {VARIANTS}")
    if weight.dim() != 2:
        raise ValueError(f"attention_round takes a [out, K] weight, got shape {tuple(weight.shape)}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("attention_round: the weight contains NaN or Inf")
    if fmt.scaling.zero_point:
        raise ValueError(f"{fmt.label}: formats with zero points are not supported by Attention Round")
    if not (sigma_start > 0 and sigma_end > 0) or iterations < 0:
        raise ValueError("sigma_start, sigma_end must be > 0 and iterations >= 0")
    w = weight.detach().float()
    s, r = _scales(w, fmt)
    grid = element_grid(fmt)
    u = w.double() / s
    # the K nearest levels of each weight (all levels when K is None or covers the grid)
    k = grid.numel() if k_nearest is None else min(int(k_nearest), grid.numel())
    if k < 1:
        raise ValueError(f"k_nearest must be >= 1, got {k_nearest}")
    levels = _nearest_levels(u, grid, k)  # [out, K, k]
    # local grid step around u: the spacing of its two neighbouring levels (the edge step at the grid ends)
    pos = torch.searchsorted(grid, u.clamp(grid[0], grid[-1]).contiguous()).clamp(1, grid.numel() - 1)
    step = (grid[pos] - grid[pos - 1]).clamp(min=torch.finfo(torch.float64).tiny)

    levels32, step32, u32, s32 = levels.float(), step.float(), u.float(), s.float()
    delta = torch.zeros_like(u32, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    t0 = time.perf_counter()
    done = 0
    for it in range(iterations):
        if time_budget_s is not None and time.perf_counter() - t0 > time_budget_s:
            break
        frac = it / max(1, iterations - 1)
        sigma = sigma_start * (sigma_end / sigma_start) ** frac
        d = (u32 + delta)[..., None] - levels32
        p = torch.softmax(-(d / step32[..., None]).square() / (2 * sigma * sigma), dim=-1)
        soft = (p * levels32).sum(-1)
        if variant == "sampled":
            pick = torch.multinomial(p.detach().reshape(-1, k), 1, generator=gen).reshape(u32.shape)
            hard = levels32.gather(-1, pick[..., None]).squeeze(-1)
            soft = soft + (hard - soft).detach()
        value = loss(soft * s32)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        losses.append(float(value.detach()))
        done += 1
    with torch.no_grad():
        d = (u + delta.detach().double())[..., None] - levels
        hard = levels.gather(-1, d.abs().argmin(-1, keepdim=True)).squeeze(-1)
        w_hat = (hard * s).float()
    sc = r.scales
    fixed = core(w_hat, fmt, scales=sc) if sc.scale is not None else core(w_hat, fmt)
    qt = QTensor.from_core(fixed, fmt, tuple(w.shape), torch.float32)
    return ARResult(qt, qt.dequantize(), delta.detach(), losses, done)


def layer_output_loss(weight: torch.Tensor, h: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Loss of a layer's output error through its input Gram matrix ``h`` (e.g. XᵀX/n): ``[K, K]``, or
    ``[groups, K, K]`` for a grouped convolution (output channels split evenly over the groups):
    Σ_groups tr((W − Ŵ) H (W − Ŵ)ᵀ) / Σ_groups tr(W H Wᵀ), the relative output error on the calibration inputs."""
    w = weight.detach().float()
    hf = h.float() if h.dim() == 3 else h.float()[None]
    g = hf.shape[0]
    if w.shape[0] % g or hf.shape[-1] != w.shape[1]:
        raise ValueError(f"Gram matrices {tuple(hf.shape)} do not fit a weight {tuple(w.shape)}")

    def quad(e: torch.Tensor) -> torch.Tensor:
        e = e.reshape(g, -1, e.shape[-1])
        return torch.einsum("gok,gkl,gol->", e, hf, e)

    norm = float(quad(w))
    scale = 1.0 / norm if norm > 0 else 1.0
    return lambda w_hat: quad(w - w_hat) * scale
