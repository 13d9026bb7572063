"""Integer-exact simulation of a P-bit accumulator, in the order the hardware accumulates.

A quantized layer computes, per output channel o and input row b, y[b, o] = Σ_k x[b, k]·q[o, k] on integers
(the scales multiply afterwards; the bias is added outside the accumulator). This module replays that sum
term by term in a signed P-bit register, two's complement range [−2^(P−1), 2^(P−1) − 1]:

- ``mode="wrap"``: two's-complement wrap-around (what an adder without overflow logic does);
- ``mode="saturate"``: clamp to the range at every step.

An *overflow event* is a step whose exact sum (register + term) leaves the range. Sequential order is k = 0,
1, ..., K − 1; ``tile=T`` splits k into consecutive tiles of T accumulated in a ``tile_bits``-bit register
each, whose results are then summed, tile after tile, in the P-bit register (multi-stage accumulation).

Wrap mode is modular, so its steps are evaluated all at once from exact int64 prefix sums (an event is a step
where the prefix sum crosses into another 2^P window); saturate mode loops over k. Both agree with a plain
Python loop over the terms (tests). With P large enough, the result equals the int64 matmul exactly.

Inputs are integer codes: activations as produced by an integer quantizer (x / scale), weights as the format's
codes. :func:`adversarial_inputs` gives the per-channel worst case.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from numcast.accumulator.bounds import as_int64, check_bits, input_range

OVERFLOW_MODES = ("wrap", "saturate")
Mode = Literal["wrap", "saturate"]


@dataclass(frozen=True)
class AccumulationResult:
    """``y``: ``[B, out]`` int64 register contents at the end; ``overflows``: ``[out]`` int64 overflow events
    summed over the rows (both stages when tiled); ``exact``: ``[B, out]`` the mathematically exact sums."""

    y: torch.Tensor
    overflows: torch.Tensor
    exact: torch.Tensor

    @property
    def overflowed(self) -> bool:
        return bool((self.overflows > 0).any())


def _wrap(v: torch.Tensor, P: int) -> torch.Tensor:
    half = 1 << (P - 1)
    return torch.remainder(v + half, 1 << P) - half


def _accumulate_terms(terms: torch.Tensor, P: int, mode: Mode) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate ``terms`` ``[..., K]`` (int64) along the last axis in a P-bit register starting at 0.
    Returns (register ``[...]``, overflow events ``[...]``)."""
    half = 1 << (P - 1)
    if mode == "wrap":
        prefix = terms.cumsum(-1)
        window = torch.div(prefix + half, 1 << P, rounding_mode="floor")
        start = torch.zeros_like(window[..., :1])
        events = (torch.diff(window, dim=-1, prepend=start) != 0).sum(-1)
        return _wrap(prefix[..., -1], P), events
    acc = torch.zeros(terms.shape[:-1], dtype=torch.int64, device=terms.device)
    events = torch.zeros_like(acc)
    for k in range(terms.shape[-1]):
        s = acc + terms[..., k]
        out = (s > half - 1) | (s < -half)
        events += out
        acc = s.clamp(-half, half - 1)
    return acc, events


def accumulate(
    x_int: torch.Tensor,
    q_int: torch.Tensor,
    accumulator_bits: int,
    mode: Mode = "wrap",
    *,
    tile: int | None = None,
    tile_bits: int | None = None,
    paired: bool = False,
    chunk_elements: int = 1 << 24,
) -> AccumulationResult:
    """Integer matmul ``x_int @ q_intᵀ`` through a P-bit accumulator.

    ``x_int``: ``[B, K]`` integer inputs shared by all channels, or with ``paired=True`` ``[out, K]``, row o
    feeding channel o only (the adversarial case; ``y`` is then ``[1, out]``). ``q_int``: ``[out, K]``
    integer weights. ``tile``/``tile_bits``: two-stage accumulation (both or neither). Rows are processed in
    chunks of about ``chunk_elements`` terms to bound memory.
    """
    if mode not in OVERFLOW_MODES:
        raise ValueError(f"unknown accumulator mode {mode!r}; one of {OVERFLOW_MODES}")
    check_bits("accumulator_bits", accumulator_bits)
    if (tile is None) != (tile_bits is None):
        raise ValueError("tile and tile_bits go together (tile length and the per-tile register's bits)")
    if tile is not None:
        if not isinstance(tile, int) or tile < 1:
            raise ValueError(f"tile must be a positive integer, got {tile!r}")
        check_bits("tile_bits", tile_bits)
    x, q = as_int64(x_int, "x_int"), as_int64(q_int, "q_int")
    if x.dim() != 2 or q.dim() != 2 or x.shape[1] != q.shape[1]:
        raise ValueError(f"need x [B, K] and q [out, K] with the same K, got {tuple(x.shape)} and {tuple(q.shape)}")
    if paired and x.shape[0] != q.shape[0]:
        raise ValueError(f"paired inputs need one row per output channel: {x.shape[0]} rows, {q.shape[0]} channels")
    out, K = q.shape
    if paired:
        terms = (x * q).unsqueeze(0)  # [1, out, K]
        return _accumulate_all(terms, accumulator_bits, mode, tile, tile_bits)
    ys, evs, exacts = [], torch.zeros(out, dtype=torch.int64, device=q.device), []
    step = max(1, chunk_elements // max(1, out * K))
    for i in range(0, x.shape[0], step):
        terms = x[i : i + step, None, :] * q[None]  # [b, out, K]
        r = _accumulate_all(terms, accumulator_bits, mode, tile, tile_bits)
        ys.append(r.y)
        exacts.append(r.exact)
        evs += r.overflows
    if not ys:
        empty = torch.zeros(0, out, dtype=torch.int64)
        return AccumulationResult(empty, evs, empty)
    return AccumulationResult(torch.cat(ys), evs, torch.cat(exacts))


def _accumulate_all(terms: torch.Tensor, P: int, mode: Mode, tile: int | None, tile_bits: int | None):
    exact = terms.sum(-1)
    if tile is None:
        y, events = _accumulate_terms(terms, P, mode)
        return AccumulationResult(y, events.sum(0), exact)
    b, out, K = terms.shape
    pad = (-K) % tile
    tiles = F.pad(terms, (0, pad)).reshape(b, out, (K + pad) // tile, tile)
    inner, inner_events = _accumulate_terms(tiles, tile_bits, mode)  # [b, out, n_tiles]
    y, outer_events = _accumulate_terms(inner, P, mode)
    return AccumulationResult(y, inner_events.sum(-1).sum(0) + outer_events.sum(0), exact)


def adversarial_inputs(q_int: torch.Tensor, input_bits: int, input_signed: bool, sign: int = 1) -> torch.Tensor:
    """Per-channel worst-case inputs ``[out, K]`` int64: x_max where q > 0 and x_min where q < 0 (``sign=+1``,
    the largest sum), or the mirror (``sign=-1``, the smallest); 0 where q = 0. Feed with ``paired=True``."""
    if sign not in (1, -1):
        raise ValueError(f"sign is +1 (largest sum) or -1 (smallest), got {sign!r}")
    q = as_int64(q_int, "q_int").reshape(q_int.shape[0], -1)
    lo, hi = input_range(input_bits, input_signed)
    up, down = (hi, lo) if sign == 1 else (lo, hi)
    x = torch.zeros_like(q)
    x[q > 0] = up
    x[q < 0] = down
    return x
