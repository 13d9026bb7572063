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
  Default (None): every level of the grid where it has at most ``FULL_GRID_LEVELS`` = 16 levels (all formats of
  ≤ 4 bits: int4/int3/int2, FP4 E2M1, MXFP4, NVFP4), the paper's "all possible quantized values"; the
  ``DEFAULT_K`` = 8 nearest above that (FP6/FP8/int8 grids, where levels far from u never win and each one costs
  memory and time in every step).

Shapes: ``weight`` ``[out, K]`` (blocks along the last axis, as everywhere in numcast). Deterministic: the
only randomness is the sampled variant's, from ``seed``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from numcast.formats.element import decode_table
from numcast.formats.engine import grid_cast
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
    r = grid_cast(w, fmt)
    if r.scales.scale is None:
        return torch.ones_like(w, dtype=torch.float64), r
    eff = r.scales.effective().double()
    per_elem = r.rows_to_tensor(eff[:, None].expand(r.values.shape).to(r.values.dtype), w.shape).double()
    return per_elem, r


FULL_GRID_LEVELS = 16  # grids up to this many levels are attended whole by default
DEFAULT_K = 8  # levels attended by default on larger grids


def attended_levels(k_nearest: int | None, n_levels: int) -> int:
    """How many levels each weight attends to: ``k_nearest`` (at most the grid), or the default (module
    docstring) for None."""
    if k_nearest is None:
        return n_levels if n_levels <= FULL_GRID_LEVELS else min(DEFAULT_K, n_levels)
    if int(k_nearest) < 1:
        raise ValueError(f"k_nearest must be >= 1, got {k_nearest}")
    return min(int(k_nearest), n_levels)


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


class AttentionRounder:
    """One weight's Attention Round state: scales, candidate levels, local steps and the learned offsets δ.

    ``soft(sigma)`` is the differentiable weight (float32 ``[out, K]``) at temperature σ (sampled variant: the
    sampled levels forward, the expectation's gradient backward); ``hard()`` the final levels; ``qtensor()``
    the result as an exact member of the format with the same scales."""

    def __init__(self, weight: torch.Tensor, fmt: FormatLike, k_nearest: int | None = None, variant: str = "soft",
                 seed: int = 0) -> None:  # fmt: skip
        fmt = get_format(fmt)
        if variant not in VARIANTS:
            raise ValueError(f"unknown Attention Round variant {variant!r}; one of {VARIANTS}")
        if weight.dim() != 2:
            raise ValueError(f"attention_round takes a [out, K] weight, got shape {tuple(weight.shape)}")
        if not bool(torch.isfinite(weight).all()):
            raise ValueError("attention_round: the weight contains NaN or Inf")
        if fmt.scaling.zero_point:
            raise ValueError(f"{fmt.label}: formats with zero points are not supported by Attention Round")
        self.fmt, self.variant = fmt, variant
        w = weight.detach().float()
        self.s, self._grid = _scales(w, fmt)
        grid = element_grid(fmt)
        self.u = w.double() / self.s
        k = self.k = attended_levels(k_nearest, grid.numel())
        self.levels = _nearest_levels(self.u, grid, k)  # [out, K, k], all levels when k covers the grid
        # local grid step around u: the spacing of its two neighbouring levels (the edge step at the grid ends)
        pos = torch.searchsorted(grid, self.u.clamp(grid[0], grid[-1]).contiguous()).clamp(1, grid.numel() - 1)
        step = (grid[pos] - grid[pos - 1]).clamp(min=torch.finfo(torch.float64).tiny)
        self._l32, self._step32, self._u32, self._s32 = (
            self.levels.float(),
            step.float(),
            self.u.float(),
            self.s.float(),
        )
        self.delta = torch.zeros_like(self._u32, requires_grad=True)
        self._gen = torch.Generator().manual_seed(seed)

    def soft(self, sigma: float) -> torch.Tensor:
        d = (self._u32 + self.delta)[..., None] - self._l32
        p = torch.softmax(-(d / self._step32[..., None]).square() / (2 * sigma * sigma), dim=-1)
        soft = (p * self._l32).sum(-1)
        if self.variant == "sampled":
            pick = torch.multinomial(p.detach().reshape(-1, self.k), 1, generator=self._gen).reshape(soft.shape)
            hard = self._l32.gather(-1, pick[..., None]).squeeze(-1)
            soft = soft + (hard - soft).detach()
        return soft * self._s32

    @torch.no_grad()
    def hard(self) -> torch.Tensor:
        d = (self.u + self.delta.detach().double())[..., None] - self.levels
        lv = self.levels.gather(-1, d.abs().argmin(-1, keepdim=True)).squeeze(-1)
        return (lv * self.s).float()

    def qtensor(self) -> QTensor:
        w_hat = self.hard()
        sc = self._grid.scales
        fixed = grid_cast(w_hat, self.fmt, scales=sc) if sc.scale is not None else grid_cast(w_hat, self.fmt)
        return QTensor.from_grid_cast(fixed, self.fmt, tuple(w_hat.shape), torch.float32)


def anneal(it: int, iterations: int, sigma_start: float, sigma_end: float) -> float:
    """σ at step ``it`` of ``iterations``: geometric from ``sigma_start`` to ``sigma_end`` (grid steps)."""
    if not (sigma_start > 0 and sigma_end > 0):
        raise ValueError("sigma_start and sigma_end must be > 0")
    return sigma_start * (sigma_end / sigma_start) ** (it / max(1, iterations - 1))


def optimise(rounders: list[AttentionRounder], step_loss: Callable[[int, float], torch.Tensor], *,
             iterations: int, lr: float, sigma_start: float, sigma_end: float,
             time_budget_s: float | None = None, progress: bool = False, desc: str = "attention-round",
             reduce_grads: Callable[[list[torch.Tensor]], None] | None = None,
             stop_together: Callable[[bool], bool] | None = None) -> list[float]:  # fmt: skip
    """Adam on every rounder's δ: ``step_loss(it, sigma)`` builds the loss from the rounders' ``soft(sigma)``.
    Returns the losses (stops early at ``time_budget_s``); ``progress`` shows a bar over the steps.

    Data-parallel runs (each process its own calibration batches): ``reduce_grads(deltas)`` averages the δ
    gradients over the processes after each backward (DDP), ``stop_together(out_of_time)`` makes every process
    stop at the same step when a time budget is set."""
    if iterations < 0:
        raise ValueError("iterations must be >= 0")
    anneal(0, 1, sigma_start, sigma_end)  # validates
    opt = torch.optim.Adam([r.delta for r in rounders], lr=lr)
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(range(iterations), desc=desc, disable=not progress, leave=False)
    for it in bar:
        if time_budget_s is not None:
            out_of_time = time.perf_counter() - t0 > time_budget_s
            if stop_together(out_of_time) if stop_together is not None else out_of_time:
                break
        value = step_loss(it, anneal(it, iterations, sigma_start, sigma_end))
        opt.zero_grad(set_to_none=True)
        value.backward()
        if reduce_grads is not None:
            reduce_grads([r.delta for r in rounders])
        opt.step()
        losses.append(float(value.detach()))
        if it % 20 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3g}")
    bar.close()
    return losses


def attention_round(
    weight: torch.Tensor,
    fmt: FormatLike,
    loss: Callable[[torch.Tensor], torch.Tensor],
    *,
    iterations: int = 500,
    lr: float = 5e-2,
    sigma_start: float = 0.5,
    sigma_end: float = 0.01,
    k_nearest: int | None = None,
    variant: str = "soft",
    seed: int = 0,
    time_budget_s: float | None = None,
    progress: bool = False,
) -> ARResult:
    """Attention Round of ``weight`` ``[out, K]`` to ``fmt`` minimising ``loss(ŵ)`` (ŵ float32 ``[out, K]``)."""
    r = AttentionRounder(weight, fmt, k_nearest, variant, seed)
    losses = optimise([r], lambda it, sigma: loss(r.soft(sigma)), iterations=iterations, lr=lr,
                      sigma_start=sigma_start, sigma_end=sigma_end, time_budget_s=time_budget_s,
                      progress=progress)  # fmt: skip
    qt = r.qtensor()
    return ARResult(qt, qt.dequantize(), r.delta.detach(), losses, len(losses))


def round_block(
    block: nn.Module,
    layers: list[tuple[str, nn.Module, FormatLike]],
    inputs: Callable[[int], tuple[tuple, dict]],
    targets: list[torch.Tensor],
    *,
    k_nearest: int | None = None,
    variant: str = "soft",
    seed: int = 0,
    **optimise_kwargs,
) -> dict[str, QTensor]:
    """Block reconstruction (the paper's objective): the offsets of every layer in ``layers`` (name inside
    ``block``, the layer, its format) are learned together so that ``block``, run with the soft weights on
    ``inputs(i)`` (the ``(args, kwargs)`` of calibration batch i: the quantized stream), reproduces
    ``targets[i]`` (the float block's output on the float stream): mean squared error, one batch per step, in
    turn. Image batches (a 4-D first argument) run channels-last (faster conv forward/backward on the CPU).
    ``optimise_kwargs`` go to :func:`optimise`. Returns {layer name: QTensor}."""
    rounders = []
    for name, mod, fmt in layers:
        w = mod.weight.detach().reshape(mod.weight.shape[0], -1)
        key = f"{name}.weight" if name else "weight"
        rounders.append((name, key, mod, AttentionRounder(w, fmt, k_nearest, variant, seed)))

    def step_loss(it: int, sigma: float) -> torch.Tensor:
        i = it % len(targets)
        args, kwargs = inputs(i)
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
            args = (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
        params = {key: r.soft(sigma).reshape(mod.weight.shape).to(mod.weight.dtype) for _, key, mod, r in rounders}
        out = functional_call(block, params, args, kwargs)
        out = out[0] if isinstance(out, (tuple, list)) else out
        return F.mse_loss(out.float(), targets[i].to(out.device).float())

    optimise([r for *_, r in rounders], step_loss, **optimise_kwargs)
    return {name: r.qtensor() for name, _, _, r in rounders}


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
