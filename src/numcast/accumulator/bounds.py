"""How many bits a dot product's accumulator needs: the data-type bound, the A2Q / A2Q+ closed forms and the
exact worst case over all inputs of a given integer range.

Setting (papers.md §3; A2Q, arXiv 2308.13504 §3; A2Q+, arXiv 2401.10432 §3): an output channel computes
y = Σ_i x_i q_i over K integer inputs x_i of N bits — unsigned in [0, 2^N − 1] or signed in
[−2^(N−1), 2^(N−1) − 1] — and integer weights q_i, accumulated in a signed P-bit register. The bias is added
outside (not counted).

Two ranges are used, on purpose:

- the **closed forms** (data-type, A2Q, A2Q+) ask for every partial sum to stay within ±(2^(P−1) − 1), the
  papers' symmetric convention;
- the **exact** rule is the hardware truth: the smallest P whose two's-complement range
  [−2^(P−1), 2^(P−1) − 1] holds the largest and the smallest partial sum any input can produce. Every input
  range contains 0, so the worst partial sum is the worst full sum (each adversarial term is ≥ 0 in magnitude
  of its sign), whatever the accumulation order.

The closed forms are therefore never below the exact figure (tested against a brute force over all inputs).
All figures are computed in integer arithmetic (bit lengths), not with floating-point logarithms (papers.md
§5.1); weights must be integers whose products stay below 2^62.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

RULES = ("exact", "a2q", "a2q+")
Rule = Literal["exact", "a2q", "a2q+"]
_LIMIT = 1 << 62  # int64 headroom for products and sums


def check_bits(name: str, bits: int, low: int = 1, high: int = 62) -> None:
    """``ValueError`` unless ``bits`` is an integer in [low, high]."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not low <= bits <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {bits!r}")


def input_range(input_bits: int, input_signed: bool) -> tuple[int, int]:
    """(x_min, x_max) of N-bit integer inputs: [0, 2^N − 1] unsigned, [−2^(N−1), 2^(N−1) − 1] signed."""
    check_bits("input_bits", input_bits)
    if input_signed:
        return -(1 << (input_bits - 1)), (1 << (input_bits - 1)) - 1
    return 0, (1 << input_bits) - 1


def bits_for_symmetric(magnitude: int) -> int:
    """Smallest P with ``magnitude`` ≤ 2^(P−1) − 1 (P ≥ 1): ``magnitude.bit_length() + 1``."""
    if magnitude < 0:
        raise ValueError(f"a magnitude is >= 0, got {magnitude}")
    return int(magnitude).bit_length() + 1


def bits_for_range(smallest: int, largest: int) -> int:
    """Smallest P whose two's-complement range [−2^(P−1), 2^(P−1) − 1] holds [smallest, largest]."""
    return max(bits_for_symmetric(max(largest, 0)), bits_for_symmetric(max(-smallest - 1, 0)))


# ---------------------------------------------------------------------------------------------- data type
def datatype_bound_bits(K: int, input_bits: int, input_signed: bool, weight_bits: int) -> int:
    """Accumulator bits knowing only the types (A2Q §3.1, Eq. 5–6): P = ⌈α + log2(1 + 2^−α) + 1⌉ with
    α = log2(K) + N + M − 1 − 1_signed, i.e. the smallest P with K·2^(N − 1_signed)·2^(M−1) ≤ 2^(P−1) − 1
    (inputs bounded by 2^(N − 1_signed), weights by 2^(M−1) in magnitude)."""
    if not isinstance(K, int) or K < 1:
        raise ValueError(f"K (the dot-product length) must be a positive integer, got {K!r}")
    check_bits("input_bits", input_bits)
    check_bits("weight_bits", weight_bits)
    worst = K << (input_bits - int(input_signed) + weight_bits - 1)
    if worst >= _LIMIT:
        raise ValueError(f"K·2^(N+M-1) = {worst} exceeds the int64 range numcast computes in")
    return bits_for_symmetric(worst)


# ---------------------------------------------------------------------------------------------- L1 budgets
def a2q_l1_bound(P: int, input_bits: int, input_signed: bool) -> float:
    """A2Q's per-channel budget on the integer weights (A2Q §3.2, Eq. 12): ‖q‖₁ ≤ (2^(P−1) − 1)·2^(1_signed − N)."""
    check_bits("accumulator bits P", P, 2)
    check_bits("input_bits", input_bits)
    return ((1 << (P - 1)) - 1) * 2.0 ** (int(input_signed) - input_bits)


def a2q_plus_l1_bound(P: int, input_bits: int) -> float:
    """A2Q+'s budget for zero-centred weights (A2Q+ §3.1, Eq. 9): ‖q‖₁ ≤ (2^P − 2)/(2^N − 1), for signed and
    unsigned inputs alike. It rests on Σq⁺ ≤ ‖q‖₁/2 and Σq⁻ ≤ ‖q‖₁/2 (A2Q+'s quantizer zero-centres the float
    weights and rounds toward zero, which keeps both halves within the budget)."""
    check_bits("accumulator bits P", P, 2)
    check_bits("input_bits", input_bits)
    return ((1 << P) - 2) / ((1 << input_bits) - 1)


# ---------------------------------------------------------------------------------------------- per channel
def as_int64(t: torch.Tensor, what: str) -> torch.Tensor:
    """``t`` as int64, refusing non-integral or non-finite floats (``ValueError``) and bool/complex (``TypeError``)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a tensor of integers, got {type(t).__name__}")
    if t.is_floating_point():
        if not bool(torch.isfinite(t).all()) or not bool((t == t.round()).all()):
            raise ValueError(f"{what} must hold integers (codes), got non-integer or non-finite values")
    elif t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{what} must be an integer or integral float tensor, got {t.dtype}")
    return t.to(torch.int64)


def _as_int_rows(q_int: torch.Tensor) -> torch.Tensor:
    q = as_int64(q_int, "q_int")
    q = q.reshape(q.shape[0], -1) if q.dim() > 1 else q.reshape(1, -1)
    if q.numel() and int(q.abs().max()) * q.shape[1] >= _LIMIT >> 32:
        raise ValueError("weights too large for exact int64 accumulator analysis")
    return q


def _positive_negative_sums(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ q⁺, Σ |q⁻|) per row, int64."""
    return q.clamp(min=0).sum(1), (-q).clamp(min=0).sum(1)


def worst_case_sums(q_int: torch.Tensor, input_bits: int, input_signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(smallest, largest) dot product per output channel over all N-bit inputs, int64 ``[out]``.

    The largest puts x_max where q > 0 and x_min where q < 0; the smallest is the mirror. ``q_int``:
    ``[out, ...]`` integer weights (flattened per output channel; a 1-D tensor is one channel).
    """
    q = _as_int_rows(q_int)
    lo, hi = input_range(input_bits, input_signed)
    pos, neg = _positive_negative_sums(q)
    return pos * lo - neg * hi, pos * hi - neg * lo


def _bit_lengths(v: torch.Tensor) -> torch.Tensor:
    """``int.bit_length`` of non-negative int64 values < 2^53, exactly (frexp, papers.md §5.1)."""
    if v.numel() and int(v.max()) >= 1 << 53:
        raise ValueError("accumulator magnitude beyond 2^53: not representable exactly")
    _, e = torch.frexp(v.to(torch.float64))
    return torch.where(v > 0, e.to(torch.int64), torch.zeros_like(v))


def min_accumulator_bits(
    q_int: torch.Tensor, input_bits: int, input_signed: bool, rule: Rule = "exact", tile: int | None = None
) -> torch.Tensor:
    """Accumulator bits each output channel needs, int64 ``[out]``.

    - ``"exact"``: the smallest two's-complement P that holds every partial sum for every N-bit input
      (:func:`worst_case_sums`).
    - ``"a2q"``: A2Q's closed form P = ⌈log2(2^(N − 1_signed)·‖q‖₁ + 1) + 1⌉ (A2Q §3.2).
    - ``"a2q+"``: A2Q+'s closed form P = ⌈log2(‖q‖₁·(2^N − 1) + 2)⌉ (A2Q+ §3.1) with ‖q‖₁ read as
      2·max(Σq⁺, Σ|q⁻|): equal to ‖q‖₁ for zero-sum weights (the published case), and never below the
      exact figure when the rounded weights do not sum to zero exactly.

    ``tile``: the dot product is split into consecutive tiles of ``tile`` inputs (the last may be shorter),
    each accumulated in its own register; the result is then the bits the *inner* (per-tile) register needs,
    the largest over the channel's tiles. The outer register that sums the tile results needs the untiled
    figure (its partial sums are partial sums of the whole dot product), see :func:`tiled_accumulator_bits`.
    """
    if rule not in RULES:
        raise ValueError(f"unknown accumulator rule {rule!r}; one of {RULES}")
    q = _as_int_rows(q_int)
    input_range(input_bits, input_signed)  # validates
    if tile is not None:
        if not isinstance(tile, int) or tile < 1:
            raise ValueError(f"tile must be a positive integer, got {tile!r}")
        K = q.shape[1]
        pad = (-K) % tile
        tiles = torch.nn.functional.pad(q, (0, pad)).reshape(q.shape[0] * ((K + pad) // tile), tile)
        per_tile = min_accumulator_bits(tiles, input_bits, input_signed, rule)
        return per_tile.reshape(q.shape[0], -1).amax(1)
    if rule == "exact":
        lo, hi = worst_case_sums(q, input_bits, input_signed)
        need_hi = _bit_lengths(hi.clamp(min=0)) + 1
        need_lo = _bit_lengths((-lo - 1).clamp(min=0)) + 1
        return torch.maximum(need_hi, need_lo)
    pos, neg = _positive_negative_sums(q)
    if rule == "a2q":
        l1 = pos + neg
        return _bit_lengths(l1 << (input_bits - int(input_signed))) + 1
    half = torch.maximum(pos, neg)  # ‖q‖₁/2 for zero-sum weights
    return _bit_lengths(half * ((1 << input_bits) - 1)) + 1


@dataclass(frozen=True)
class TiledBits:
    """Per-channel bits of a two-stage accumulation: ``inner`` (per tile) and ``outer`` (sum of tiles)."""

    inner: torch.Tensor
    outer: torch.Tensor


def tiled_accumulator_bits(
    q_int: torch.Tensor, input_bits: int, input_signed: bool, tile: int, rule: Rule = "exact"
) -> TiledBits:
    """Bits for multi-stage accumulation (AXE, arXiv 2409.17092 §3.3): tiles of ``tile`` inputs summed in a
    P_inner-bit register each, the tile results summed in a P_outer-bit register. Both ``[out]`` int64."""
    return TiledBits(
        inner=min_accumulator_bits(q_int, input_bits, input_signed, rule, tile=tile),
        outer=min_accumulator_bits(q_int, input_bits, input_signed, rule),
    )
