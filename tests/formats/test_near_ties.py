"""Inputs within a hair of a rounding decision point, against an exact rational reference.

A cast with a scale that is not a power of two rounds the real quotient x/s onto the element grid. The decision
points of that rounding (midpoints between grid values for nearest, the grid values for directed modes) have few
significant bits, but the effective scale may have many (NVFP4's s_b·s_t: 4 + 24; an FP32 per-channel scale: 24),
so a float32 x can lie within 2^-30 of d·s without being d·s: a float32 quotient then lands on d and the tie rule
decides what the real quotient does not (``numcast.formats.element.work_dtype`` says when float32 is safe).
Here every such x is built on purpose, on both sides of every decision point of each row's grid, and the cast is
compared with ``fractions.Fraction`` arithmetic: the exact quotient, the nearest grid value (ties to the even
integer, or to the minifloat whose ml_dtypes code is even) or the floor, saturated, times the scale.
"""

from __future__ import annotations

from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
import torch
from helpers import assert_bitwise

from numcast.formats.engine import grid_cast
from numcast.formats.fused import compiler_available
from numcast.formats.layout import Layout
from numcast.formats.ops import cast
from numcast.formats.registry import get_format
from numcast.formats.spec import IntElement

ML_DTYPES = {(2, 1): ml_dtypes.float4_e2m1fn, (4, 3): ml_dtypes.float8_e4m3fn}  # (ebits, mbits) → reference dtype
FORMATS = ["nvfp4", "int8_channel", "int4_channel", "fp8_e4m3_tensor", "int4_g128", "int8_g32", "gguf_q8_0",
           "gguf_q4_0", "uint4_g128_zp"]  # fmt: skip


def grid_of(elem) -> tuple[list[Fraction], dict[Fraction, bool]]:
    """(sorted grid values, value → whether ties go to it) from an independent source: the integers, or every
    finite value of the ml_dtypes type with its code's parity."""
    if isinstance(elem, IntElement):
        values = [Fraction(k) for k in range(elem.qmin, elem.qmax + 1)]
        return values, {v: v.numerator % 2 == 0 for v in values}
    codes = np.arange(2**elem.bits, dtype=np.uint8)  # ml_dtypes keeps a 4-bit code in a byte of its own
    vals = codes.view(ML_DTYPES[(elem.ebits, elem.mbits)])
    even: dict[Fraction, bool] = {}
    for c, v in zip(codes, vals.astype(np.float64), strict=True):
        if np.isfinite(v):
            even[Fraction(float(v))] = even.get(Fraction(float(v)), False) or bool(c % 2 == 0)
    return sorted(even), even


def round_exact(q: Fraction, grid: list[Fraction], even: dict[Fraction, bool], mode: str) -> Fraction:
    """q onto the grid (saturating at its ends): nearest with ties to the even value, or floor."""
    if q <= grid[0]:
        return grid[0]
    if q >= grid[-1]:
        return grid[-1]
    hi = next(i for i, g in enumerate(grid) if g >= q)
    lo_v, hi_v = grid[hi - 1], grid[hi]
    if hi_v == q:
        return hi_v
    if mode == "floor":
        return lo_v
    if q - lo_v != hi_v - q:
        return lo_v if q - lo_v < hi_v - q else hi_v
    return lo_v if even[lo_v] else hi_v


def decision_points(grid: list[Fraction], mode: str) -> list[Fraction]:
    if mode == "floor":
        return grid[1:-1]
    return [(a + b) / 2 for a, b in zip(grid, grid[1:], strict=False)]


def near(target: Fraction) -> list[float]:
    """The float32 numbers next to ``target`` on either side (and ``target`` itself where it is one)."""
    t = np.float32(float(target))
    out = {float(t), float(np.nextafter(t, np.float32(np.inf))), float(np.nextafter(t, np.float32(-np.inf)))}
    return sorted(out)


def row_grid(fmt, z: Fraction) -> tuple[list[Fraction], dict[Fraction, bool]]:
    """The grid x/s rounds onto: the element grid, or for a zero-point format the integer codes less z (x/s is
    rounded first and shifted by the integer z after, PyTorch's fake_quantize order)."""
    grid, even = grid_of(fmt.element)
    if z == 0:
        return grid, even
    shifted = [g - z for g in grid]
    return shifted, {v: v.numerator % 2 == 0 for v in shifted}


def near_tie_tensor(fmt, mode: str, seed: int) -> torch.Tensor:
    """[8, 128] float32 whose rows (in the format's layout) keep their random scales while most of their values
    sit next to d·s for decision points d."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 128, generator=g) * torch.exp(torch.randn(8, 1, generator=g))
    layout = Layout.of(x.shape, fmt.scaling)
    rows = layout.to_rows(x).clone()
    before = grid_cast(x, fmt).scales
    eff, zp = before.effective(), before.zero_point
    rng = np.random.default_rng(seed)
    for r in range(rows.shape[0]):
        s = Fraction(float(eff[r]))
        grid, _ = row_grid(fmt, Fraction(float(zp[r])) if zp is not None else Fraction(0))
        ends = {int(rows[r].argmin()), int(rows[r].argmax())}  # the row's extremes (so its scale) stay
        lo, hi = float(rows[r].min()), float(rows[r].max())
        candidates = [v for d in decision_points(grid, mode) for v in near(d * s) if lo < v < hi]
        slots = [i for i in range(rows.shape[1]) if i not in ends]
        for i, k in zip(slots, rng.permutation(len(candidates)), strict=False):
            rows[r, i] = candidates[k]
    out = layout.from_rows(rows).reshape(x.shape)
    after = grid_cast(out, fmt).scales
    assert torch.equal(after.effective(), eff), "the near-tie values moved a scale"
    return out


def reference(x: torch.Tensor, fmt, mode: str) -> torch.Tensor:
    """Each value's exact rounding (rationals) with the scales the cast derives."""
    scales = grid_cast(x, fmt).scales
    layout = Layout.of(x.shape, fmt.scaling)
    rows = layout.to_rows(x)
    out = torch.empty_like(rows, dtype=torch.float64)
    eff = scales.effective()
    for r in range(rows.shape[0]):
        s = Fraction(float(eff[r]))
        grid, even = row_grid(fmt, Fraction(float(scales.zero_point[r])) if scales.zero_point is not None else 0)
        for i in range(rows.shape[1]):
            v = float(round_exact(Fraction(float(rows[r, i])) / s, grid, even, mode))
            if v == 0 and not isinstance(fmt.element, IntElement) and float(rows[r, i]) < 0:
                v = -0.0  # a minifloat keeps the sign of zero (an integer's zero is +0)
            out[r, i] = v * float(s)  # exact in float64 (≤ 32 significant bits); 0 · s < 0 is −0
    return layout.from_rows(out).reshape(x.shape).float()


@pytest.mark.parametrize("backend", ["eager", "compiled"])
@pytest.mark.parametrize("mode", ["nearest_even", "floor"])
@pytest.mark.parametrize("name", FORMATS)
def test_values_next_to_decision_points_round_as_the_real_quotient(name, mode, backend):
    fmt = get_format(name)
    if mode == "floor" and fmt.scaling.rule == "signed_max":
        pytest.skip("a negative scale mirrors directed modes (tested in test_engine)")
    if backend == "compiled" and not compiler_available("cpu"):
        pytest.skip("no C++ compiler for inductor")
    x = near_tie_tensor(fmt, mode, seed=FORMATS.index(name))
    assert_bitwise(cast(x, fmt, rounding=mode, backend=backend), reference(x, fmt, mode), f"{name} {mode}")
