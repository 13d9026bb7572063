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

Cost of a step (the method is meant to be a fast PTQ method: the paper quantizes ResNet18/MobileNetV2 with 1,024
samples in about ten minutes on a GPU):

- the soft weights: the closed-form derivative dū/dδ = Var_p(g)/(σ²Δ²) (:class:`_SoftLevel`) instead of autograd
  through the softmax, and only the levels whose attention is above e^−30 of the largest one's enter a step
  (``WINDOW_LOGIT``): all k while σ is large, two once σ is a fraction of a step; the same values and gradient
  as the softmax over every attended level to float32 resolution (tested against it);
- block reconstruction (:func:`round_block`): each step runs the block on a mini-batch of ``batch_size``
  samples drawn from all the cached calibration samples (:class:`MiniBatches`, AdaRound/BRECQ style), so a
  larger calibration set costs only the forward passes that cache it; eval-mode batch norms that follow a
  rounded convolution are folded into it for the steps (:func:`fold_batch_norms`: the same function of the
  weights, one memory-bound normalisation less forward and backward).

Shapes: ``weight`` ``[out, K]`` (blocks along the last axis, as everywhere in numcast). Deterministic: the
randomness (the sampled variant's levels, the mini-batches) comes from generators seeded with ``seed``, never
the global RNG.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.fx
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
WINDOW_LOGIT = 30.0  # a step leaves out the levels whose attention is below e^−30 of the largest one's
DEFAULT_BATCH_SIZE = 16  # calibration samples per step of a block reconstruction: on MobileNetV2 (int4, int2) a
# lower KL than 8 (by ~6 %), at 3/8 of 32's step time on the CPU


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
    grid and lie within the 2k levels around u's position, so only that window is searched. The whole grid
    (k ≥ its size) is returned as a broadcast view of ``grid``."""
    n = grid.numel()
    if k >= n:  # the whole grid: one shared row, broadcast (a view, no memory per weight)
        return grid.expand(*u.shape, n)
    if n <= 2 * k:
        window = grid.expand(*u.shape, n)
    else:
        pos = torch.searchsorted(grid, u.contiguous())
        start = (pos - k).clamp(0, n - 2 * k)
        window = grid[start[..., None] + torch.arange(2 * k)]
    idx = (u[..., None] - window).abs().topk(k, dim=-1, largest=False).indices.sort(-1).values
    return window.gather(-1, idx)


LUT_CELLS = 1 << 20  # the largest lookup table of grid positions (fp8_e4m3 needs 458,752 cells; e5m2 7.5e9)


class _LevelCounter:
    """``count(v)``: how many levels of the sorted ``grid`` are ≤ v (the index of the first level above v), for
    float32 v of any shape. A binary search per value (``torch.searchsorted``) is slow on the CPU, so: index
    arithmetic on a uniform grid (``step`` = its spacing, integer formats), else a lookup table over cells of the
    smallest spacing when every level lies on that lattice (the minifloat grids up to FP8 E4M3: ≤ ``LUT_CELLS``
    cells), else the binary search."""

    def __init__(self, grid: torch.Tensor) -> None:
        self.grid = grid.float()
        self.slack = float(grid.abs().max()) * 2.0**-20  # ≥ 8 float32 ulps of the grid's largest level
        self.step: torch.Tensor | None = None
        self.table: torch.Tensor | None = None
        n = grid.numel()
        gaps = grid.diff()
        if n < 2 or not bool((gaps > 0).all()):
            return
        gmin = gaps.min()
        cells = (grid - grid[0]) / gmin
        self.g0, self.gmin = self.grid[0], gmin.float()
        if bool((gaps == gaps[0]).all()):
            self.step = self.gmin
        elif bool((cells == cells.round()).all()) and float(cells[-1]) <= LUT_CELLS:
            m = cells.round().long()
            self.table = torch.bincount(m + 1, minlength=int(m[-1]) + 2).cumsum(0)  # [c + 1]: levels on cells ≤ c

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        if self.step is None and self.table is None:
            return torch.searchsorted(self.grid, v.contiguous(), right=True)
        c = torch.floor((v - self.g0) / self.gmin)  # the cell of v: levels sit on cell starts
        if self.step is not None:
            return (c + 1).clamp(0, self.grid.numel()).long()
        return self.table[(c + 1).clamp(0, self.table.numel() - 1).long()]


class _SoftLevel(torch.autograd.Function):
    """The soft level ū = Σ_g p_g·g of each weight, p = softmax_g(−a·d_g²), d_g = x − g over its attended levels,
    with the exact derivative in closed form: ∂ log p_g/∂x = 2a·(g − ū), so dū/dx = 2a·Var_p(g) and the backward
    keeps one number per weight instead of autograd's graph over every level.

    ``x``, ``a``: ``[N]`` (x carries the gradient); ``d``: ``[w, N]``, level-major (every operation runs along the
    weights, contiguous; a softmax over a short last axis is many times slower on the CPU). ū = x − Σ p·d and the
    variance Σ p·(d − d̄)² (two passes: no cancellation when p sits on one level late in the anneal, where
    E[d²] − d̄² would leave rounding noise for Adam to amplify). Returns (ū, p), p ``[w, N]`` without a gradient
    (for the sampled variant)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, d: torch.Tensor, a: torch.Tensor):  # type: ignore[override]
        d2 = d.square()
        # the nearest level's term is 1 (no overflow, no 0/0); logits below −60 (e^−60 ≈ 1e−26, the window's levels
        # beyond what some weights need) are held there: exp into float32 subnormals is many times slower
        e = d2.sub_(d2.amin(0)).mul_(-a).clamp_(min=-60.0).exp_()
        p = e.div_(e.sum(0))
        dbar = (p * d).sum(0)
        var = (d - dbar).square_().mul_(p).sum(0)
        ctx.save_for_backward(var.mul_(2 * a))
        ctx.mark_non_differentiable(p)
        return x - dbar, p

    @staticmethod
    def backward(ctx, grad_soft: torch.Tensor, _grad_p):  # type: ignore[override]
        (slope,) = ctx.saved_tensors
        return grad_soft * slope, None, None


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
        # local grid step around u: the spacing of its two neighbouring levels (the edge step at the grid ends)
        pos = torch.searchsorted(grid, self.u.clamp(grid[0], grid[-1]).contiguous()).clamp(1, grid.numel() - 1)
        step = (grid[pos] - grid[pos - 1]).clamp(min=torch.finfo(torch.float64).tiny)
        # the steps work in float32 on grid indices: each weight's levels are the grid segment [seg, seg + k)
        self._grid64, self._grid32 = grid, grid.float()
        if k == grid.numel():
            self._seg = torch.tensor(0)
        else:  # the k nearest levels of u are contiguous in the grid: keep where they start
            self._seg = torch.searchsorted(grid, _nearest_levels(self.u, grid, k)[..., 0].contiguous())
        self._count = _LevelCounter(grid)
        self._inv_step2 = step.square().reciprocal().float()  # 1/Δ², so that d_g² = (u + δ − g)²/Δ²
        self._u32, self._s32 = self.u.reshape(-1).float(), self.s.float()
        self.delta = torch.zeros_like(self.u, dtype=torch.float32, requires_grad=True)
        self._gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def _window(self, x: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(d, start): d = x − g ``[w, N]`` over the levels that carry attention at x = u + δ ``[N]``: every
        level g of the weight's k with a·(x − g)² ≤ a·D² + ``WINDOW_LOGIT`` (D the distance to its nearest level),
        so each one left out has a probability below e^−30 ≈ 1e−13 of the largest one's, beneath float32
        resolution. The levels are contiguous in the grid, so one width w (the widest weight's) serves all: a few
        levels once σ is a fraction of a grid step instead of all k. ``start`` ``[N]``: the grid index of each
        weight's first level in the window."""
        g = self._grid32
        if self._seg.dim() == 0:  # the whole grid: plain bounds
            lo_seg, hi_seg = 0, self.k - 1

            def clamp(j):
                return j.clamp_(0, self.k - 1)

        else:
            lo_seg = self._seg.reshape(-1)
            hi_seg = lo_seg + (self.k - 1)  # the last level of each weight's segment

            def clamp(j):
                return torch.minimum(torch.maximum(j, lo_seg), hi_seg)

        pos = self._count(x)  # the first level above x
        near = torch.minimum((x - g[clamp(pos - 1)]).abs(), (g[clamp(pos)] - x).abs())
        # the radius, widened by the float32 error of the positions: the nearest level, and a partner in a near tie,
        # are always inside (at the grid's ends the clamps keep the end level)
        r = (near.square_() + WINDOW_LOGIT / a).sqrt_() + self._count.slack
        lo = clamp(self._count(x - r))
        w = int((self._count(x + r) - lo).max().clamp(1, self.k)) if lo.numel() else 1
        start = torch.minimum(lo, hi_seg + 1 - w) if self._seg.dim() else lo.clamp_(max=hi_seg + 1 - w)
        j = torch.arange(w)[:, None]
        if self._count.step is not None:  # a uniform grid: g_j = g_0 + j·Δg, no gather
            return (x - g[start]) - j * self._count.step, start
        return x - g[start + j], start

    def soft(self, sigma: float) -> torch.Tensor:
        a = self._inv_step2.reshape(-1) * (0.5 / (sigma * sigma))  # p_g ∝ exp(−a·(u + δ − g)²), a = 1/(2σ²Δ²)
        x = self._u32 + self.delta.reshape(-1)
        d, start = self._window(x.detach(), a)
        soft, p = _SoftLevel.apply(x, d, a)
        if self.variant == "sampled":
            hard = self._grid32[start + torch.multinomial(p.T, 1, generator=self._gen)[:, 0]]
            soft = soft + (hard - soft).detach()
        return soft.reshape(self.u.shape) * self._s32

    @torch.no_grad()
    def hard(self) -> torch.Tensor:
        x = (self.u + self.delta.detach().double()).contiguous()
        g, lo = self._grid64, self._seg
        hi = lo + (self.k - 1)
        pos = torch.searchsorted(g, x, right=True)  # the nearest of the weight's levels brackets x (ties: lower)
        below, above = torch.minimum(torch.maximum(pos - 1, lo), hi), torch.minimum(torch.maximum(pos, lo), hi)
        lv = torch.where((x - g[below]).abs() <= (g[above] - x).abs(), g[below], g[above])
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


@dataclass(frozen=True)
class _Slot:
    """Where the j-th tensor of a block call sits in its (args, kwargs) template."""

    j: int


def _template(obj, leaves: list[torch.Tensor]):
    """``obj`` with every tensor replaced by a :class:`_Slot` (the tensor appended to ``leaves``); tuples
    (named ones too), lists and mappings are walked, anything else is kept as it is."""
    if isinstance(obj, torch.Tensor):
        leaves.append(obj)
        return _Slot(len(leaves) - 1)
    if isinstance(obj, tuple):
        items = [_template(o, leaves) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, list):
        return [_template(o, leaves) for o in obj]
    if isinstance(obj, Mapping):
        return {k: _template(v, leaves) for k, v in obj.items()}
    return obj


def _fill(template, leaves: list[torch.Tensor]):
    """The inverse of :func:`_template`: the slots replaced by ``leaves``."""
    if isinstance(template, _Slot):
        return leaves[template.j]
    if isinstance(template, tuple):
        items = [_fill(o, leaves) for o in template]
        return type(template)(*items) if hasattr(template, "_fields") else tuple(items)
    if isinstance(template, list):
        return [_fill(o, leaves) for o in template]
    if isinstance(template, dict):
        return {k: _fill(v, leaves) for k, v in template.items()}
    return template


def _equal_templates(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - objects whose == is not a plain truth value
        return False


def _channels_last(args: tuple) -> tuple:
    """An image batch (a 4-D first argument) runs channels-last: faster conv forward/backward on the CPU."""
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
        return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
    return args


class MiniBatches:
    """The mini-batches of a block reconstruction's steps (AdaRound / BRECQ style): each step draws
    ``batch_size`` samples, without replacement, from all the cached calibration samples (every batch's), with
    a ``torch.Generator`` seeded with ``seed`` (never the global RNG: the same seed gives the same draws). A step
    then costs the same whatever the size of the calibration set: more samples only cost the runner's forward
    passes that cache them. When ``batch_size`` covers every sample, each step runs them all (assembled once).

    ``inputs(i)`` are the block's ``(args, kwargs)`` on calibration batch i, ``targets[i]`` its target
    ``[n_i, ...]``. A call splits by sample when every tensor whose first dimension is the batch's sample count
    n_i in every batch is a per-sample one (the stream, per-sample masks) and every other argument is the same in
    every batch (shared position tables, flags); the samples stay where the targets are (the runner's offloaded
    streams) and each step moves only its own to the device the runner computes on. Calls that do not split
    (per-batch sequence lengths, say), or ``batch_size`` None: each step runs one whole calibration batch, in a
    seeded random order, every batch once per epoch. ``why_whole`` says why (None when split by sample).

    ``masks[i]`` (optional; bool ``[n_i, tokens]`` or None: every row) marks the rows of ``targets[i]`` that count
    (a padded text batch's real tokens); :meth:`draw_masked` returns the drawn samples' rows with the call.

    Under torch.distributed each rank draws from its own share with the same seed (the draws are positions in
    the share): deterministic on every rank, and equal to one process where the shares are equal."""

    def __init__(self, inputs: Callable[[int], tuple[tuple, dict]], targets: list[torch.Tensor],
                 batch_size: int | None, seed: int = 0,
                 masks: list[torch.Tensor | None] | None = None) -> None:  # fmt: skip
        if not targets:
            raise ValueError("block reconstruction needs at least one calibration batch")
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1 (or None: whole calibration batches), got {batch_size}")
        self.masks = list(masks) if masks is not None else [None] * len(targets)
        for i, (m, t) in enumerate(zip(self.masks, targets, strict=True)):
            if m is not None and (m.dtype != torch.bool or t.dim() < 3 or m.shape != t.shape[:2]):
                raise ValueError(f"calibration batch {i}: a row mask must be bool [samples, tokens] = the target's "
                                 f"first two dims {tuple(t.shape[:2])}, got {m.dtype} {tuple(m.shape)}")  # fmt: skip
        self.inputs, self.targets, self.batch_size = inputs, targets, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._order: list[int] = []
        self._all: tuple | None = None
        self.why_whole: str | None = "batch_size is None" if batch_size is None else None
        if batch_size is not None:
            self.why_whole = self._split()

    def _split(self) -> str | None:
        """Cache each batch's per-sample tensors by slot; the reason the calls do not split, or None."""
        templates, leaves = [], []
        for i in range(len(self.targets)):
            args, kwargs = self.inputs(i)
            out: list[torch.Tensor] = []
            templates.append(_template((tuple(args), dict(kwargs)), out))
            leaves.append(out)
        ns = [t.shape[0] if t.dim() else 0 for t in self.targets]
        if not all(_equal_templates(t, templates[0]) for t in templates[1:]):
            return "the batches' block calls differ in structure"
        if any(t.shape[1:] != self.targets[0].shape[1:] for t in self.targets):
            return "the targets' shapes differ beyond the sample dimension"
        per_sample = [all(b[j].dim() >= 1 and b[j].shape[0] == n for b, n in zip(leaves, ns, strict=True))
                      for j in range(len(leaves[0]))]  # fmt: skip
        for j, split in enumerate(per_sample):
            first = leaves[0][j]
            for b in leaves[1:]:
                t = b[j]
                if split and (t.shape[1:] != first.shape[1:] or t.dtype != first.dtype):
                    return f"a per-sample argument changes shape or dtype between batches ({tuple(t.shape)})"
                if not split and not (t is first or (t.shape == first.shape and t.dtype == first.dtype
                                                      and bool(torch.equal(t.to(first.device), first)))):  # fmt: skip
                    return f"an argument that is not per-sample differs between batches (shape {tuple(t.shape)})"
        if not any(per_sample):
            return "no argument of the block call is per-sample"
        bank = self.targets[0].device  # where the runner keeps what it caches
        self._template = templates[0]
        self._devices = [t.device for t in leaves[0]]
        self._bank = [[b[j].to(bank) for b in leaves] if split else None for j, split in enumerate(per_sample)]
        self._shared = [None if split else t for t, split in zip(leaves[0], per_sample, strict=True)]
        self._offsets = torch.tensor([0, *ns]).cumsum(0)
        if any(m is not None for m in self.masks):  # every batch's rows (all of them where it has no mask)
            self._mask_bank = [torch.ones(t.shape[:2], dtype=torch.bool) if m is None else m.cpu()
                               for m, t in zip(self.masks, self.targets, strict=True)]  # fmt: skip
        return None

    @property
    def samples(self) -> int:
        """The number of cached calibration samples."""
        return int(sum(t.shape[0] if t.dim() else 1 for t in self.targets))

    _mask_bank: list[torch.Tensor] | None = None

    def peek(self) -> tuple[tuple, dict, torch.Tensor]:
        """A call and target for checks (the first calibration batch's, or its first samples), drawing nothing."""
        if self.why_whole is not None:
            args, kwargs = self.inputs(0)
            return _channels_last(tuple(args)), kwargs, self.targets[0]
        return self._gather(torch.arange(min(int(self._offsets[1]), self.batch_size)))[:3]

    def draw(self) -> tuple[tuple, dict, torch.Tensor]:
        """The next step's block ``(args, kwargs)`` and target."""
        return self.draw_masked()[:3]

    def draw_masked(self) -> tuple[tuple, dict, torch.Tensor, torch.Tensor | None]:
        """The next step's block ``(args, kwargs)``, target and the target rows that count (None: all)."""
        if self.why_whole is not None:
            if not self._order:
                self._order = torch.randperm(len(self.targets), generator=self.generator).tolist()
            i = self._order.pop(0)
            args, kwargs = self.inputs(i)
            return _channels_last(tuple(args)), kwargs, self.targets[i], self.masks[i]
        n = int(self._offsets[-1])
        if self.batch_size >= n:  # every sample in every step: assembled once
            if self._all is None:
                self._all = self._gather(torch.arange(n))
            return self._all
        return self._gather(torch.randperm(n, generator=self.generator)[: self.batch_size].sort().values)

    def _gather(self, idx: torch.Tensor) -> tuple[tuple, dict, torch.Tensor, torch.Tensor | None]:
        """The call, target and row mask of the samples ``idx`` (ascending positions in the batches'
        concatenation)."""
        batch = torch.searchsorted(self._offsets, idx, right=True) - 1
        ids, counts = torch.unique_consecutive(batch, return_counts=True)
        rows = (idx - self._offsets[batch]).split(counts.tolist())
        pieces = list(zip(ids.tolist(), rows, strict=True))

        def take(per_batch: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat([per_batch[b].index_select(0, r.to(per_batch[b].device)) for b, r in pieces])

        leaves = [self._shared[j] if bank is None else take(bank).to(self._devices[j])
                  for j, bank in enumerate(self._bank)]  # fmt: skip
        args, kwargs = _fill(self._template, leaves)
        mask = None if self._mask_bank is None else take(self._mask_bank)
        return _channels_last(args), kwargs, take(self.targets), None if mask is None or mask.all() else mask


class _ConvBatchNorm(nn.Module):
    """A convolution followed by an eval-mode batch norm as one convolution: weight·γ/√(var + ε) per output
    channel, bias (b − μ)·γ/√(var + ε) + β. It reads ``conv.weight`` at call time, so a ``functional_call`` that
    swaps the convolution's weight (the soft weights) reaches it."""

    def __init__(self, conv: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.conv = conv
        with torch.no_grad():
            scale = torch.rsqrt(bn.running_var.float() + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight.float()
            shift = -bn.running_mean.float() * scale
            if conv.bias is not None:
                shift = shift + conv.bias.float() * scale
            if bn.bias is not None:
                shift = shift + bn.bias.float()
        dtype = conv.weight.dtype
        self.register_buffer("scale", scale.to(dtype).reshape(-1, *[1] * (conv.weight.dim() - 1)))
        self.register_buffer("shift", shift.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = getattr(self.conv, "static_padding", None)  # TF-'SAME' convolutions (EfficientNet) pad first
        if isinstance(pad, nn.Module):
            x = pad(x)
        return self.conv._conv_forward(x, self.conv.weight * self.scale, self.shift)


def _foldable_conv(m: nn.Module) -> bool:
    """A plain convolution, or one whose forward only pads first (``static_padding``): :class:`_ConvBatchNorm`
    computes exactly what its forward does."""
    plain = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return type(m) in plain or (isinstance(m, plain) and isinstance(getattr(m, "static_padding", None), nn.Module))


class _ConvLeafTracer(torch.fx.Tracer):
    """``torch.fx`` tracing that keeps every convolution one call (also subclasses from other packages)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or super().is_leaf_module(m, module_qualified_name)


def fold_batch_norms(block: nn.Module, convs: list[nn.Module]) -> nn.Module | None:
    """``block`` with each of ``convs`` that feeds only an eval-mode batch norm fused with it
    (:class:`_ConvBatchNorm`): the same function of the convolutions' weights with one memory-bound
    normalisation fewer forward and backward (a third of a MobileNetV2 step on the CPU). A ``torch.fx`` trace
    that shares ``block``'s modules (the convolutions keep their names, so ``functional_call`` on the result
    swaps their weights). None when nothing folds or the block does not trace."""
    bns = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    ids = {id(c) for c in convs if _foldable_conv(c)}
    if not ids or not any(isinstance(m, bns) and not m.training for m in block.modules()):
        return None
    try:
        gm = torch.fx.GraphModule(block, _ConvLeafTracer().trace(block))
    except Exception:  # noqa: BLE001 - untraceable Python control flow: run the block as it is
        return None
    mods = dict(gm.named_modules())
    folded = 0
    for node in list(gm.graph.nodes):
        bn = mods.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, bns) or bn.training or bn.running_mean is None or len(node.args) != 1:
            continue
        src = node.args[0]
        conv = mods.get(src.target) if isinstance(src, torch.fx.Node) and src.op == "call_module" else None
        if conv is None or id(conv) not in ids or len(src.users) != 1 or conv.out_channels != bn.num_features:
            continue
        name = f"_ar_fold{folded}"
        gm.add_submodule(name, _ConvBatchNorm(conv, bn))
        src.target = name
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        folded += 1
    if not folded:
        return None
    gm.recompile()
    return gm


def round_block(
    block: nn.Module,
    layers: list[tuple[str, nn.Module, FormatLike]],
    inputs: Callable[[int], tuple[tuple, dict]],
    targets: list[torch.Tensor],
    *,
    k_nearest: int | None = None,
    variant: str = "soft",
    seed: int = 0,
    batch_size: int | None = DEFAULT_BATCH_SIZE,
    masks: list[torch.Tensor | None] | None = None,
    **optimise_kwargs,
) -> dict[str, QTensor]:
    """Block reconstruction (the paper's objective): the offsets of every layer in ``layers`` (name inside
    ``block``, the layer, its format) are learned together so that ``block``, run with the soft weights on
    ``inputs(i)`` (the ``(args, kwargs)`` of calibration batch i: the quantized stream), reproduces
    ``targets[i]`` (the float block's output on the float stream): mean squared error over a mini-batch of
    ``batch_size`` samples per step, drawn from every batch's samples with a generator seeded with ``seed``
    (:class:`MiniBatches`; None: one whole calibration batch per step); ``masks[i]`` (bool ``[n_i, tokens]``, or
    None) keeps the loss to the rows that count (a padded text batch's real tokens). Image batches (a 4-D first
    argument) run channels-last (faster conv forward/backward on the CPU). ``optimise_kwargs`` go to :func:`optimise`.
    Returns {layer name: QTensor}."""
    rounders = []
    for name, mod, fmt in layers:
        w = mod.weight.detach().reshape(mod.weight.shape[0], -1)
        key = f"{name}.weight" if name else "weight"
        rounders.append((name, key, mod, AttentionRounder(w, fmt, k_nearest, variant, seed)))
    batches = MiniBatches(inputs, targets, batch_size, seed, masks)
    if batches.why_whole is not None and batch_size is not None:
        warnings.warn(f"Attention Round: the block's calibration calls do not split by sample ({batches.why_whole}); "
                      "each step runs one whole calibration batch", stacklevel=2)  # fmt: skip
    run = _folded_or_block(block, [mod for _, _, mod, _ in rounders], batches)

    def step_loss(it: int, sigma: float) -> torch.Tensor:
        args, kwargs, target, mask = batches.draw_masked()
        params = {key: r.soft(sigma).reshape(mod.weight.shape).to(mod.weight.dtype) for _, key, mod, r in rounders}
        out = functional_call(run, params, args, kwargs)
        out = (out[0] if isinstance(out, (tuple, list)) else out).float()
        target = target.to(out.device).float()
        if mask is not None:
            mask = mask.to(out.device)
            out, target = out[mask], target[mask]
        return F.mse_loss(out, target)

    optimise([r for *_, r in rounders], step_loss, **optimise_kwargs)
    return {name: r.qtensor() for name, _, _, r in rounders}


def _folded_or_block(block: nn.Module, convs: list[nn.Module], batches: MiniBatches) -> nn.Module:
    """:func:`fold_batch_norms` of ``block`` where it gives the block's output on a calibration mini-batch
    (float tolerance), else ``block`` itself."""
    folded = fold_batch_norms(block, convs)
    if folded is None:
        return block
    args, kwargs, _ = batches.peek()
    with torch.no_grad():
        want, got = block(*args, **kwargs), folded(*args, **kwargs)
    want, got = (o[0] if isinstance(o, (tuple, list)) else o for o in (want, got))
    scale = float(want.abs().max()) if want.numel() else 0.0
    same = want.shape == got.shape and bool(torch.allclose(got, want, rtol=1e-4, atol=1e-5 * max(scale, 1e-30)))
    return folded if same else block


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
