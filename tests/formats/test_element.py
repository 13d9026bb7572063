"""Element formats against ml_dtypes / numpy: decode tables, casts of random and adversarial values, and
exhaustive code round trips. ml_dtypes is the independent reference (the issue's test design)."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch
from helpers import adversarial_f32, assert_bitwise

from numcast.formats.element import (
    all_finite,
    arithmetic_rounding_exact,
    cast_element,
    decode,
    decode_table,
    encode,
    floor_log2,
    grid_step,
    pattern_codes,
    pow2,
    work_dtype,
)
from numcast.formats.ops import cast
from numcast.formats.registry import get_format, list_formats
from numcast.formats.spec import IntElement

# numcast name -> reference numpy dtype
REFERENCE = {
    "fp8_e4m3": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
    "fp8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz,
    "fp8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
    "fp6_e2m3": ml_dtypes.float6_e2m3fn,
    "fp6_e3m2": ml_dtypes.float6_e3m2fn,
    "fp4_e2m1": ml_dtypes.float4_e2m1fn,
    "e8m0": ml_dtypes.float8_e8m0fnu,
    "bf16": ml_dtypes.bfloat16,
    "fp16": np.float16,
    # formats ml_dtypes has that numcast builds from parameters
    "e4m3_ieee": ml_dtypes.float8_e4m3,
    "e3m4_ieee": ml_dtypes.float8_e3m4,
    "e4m3b11_fnuz": ml_dtypes.float8_e4m3b11fnuz,
}
UNSCALED = [f.name for f in list_formats() if not f.scaling.scaled and f.element.bits <= 16]  # exhaustive
FLOAT_REF = sorted(REFERENCE)


def ref_values(name: str, x: np.ndarray, saturate: bool) -> np.ndarray:
    """ml_dtypes' cast; saturation = clip to ±max first (ml_dtypes itself overflows by policy)."""
    dt = REFERENCE[name]
    fmax = float(ml_dtypes.finfo(dt).max)
    xs = np.clip(x, -fmax, fmax) if saturate else x
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf/NaN is the point of the test
        return xs.astype(dt).astype(np.float32)


def bits_of(name: str) -> int:
    return get_format(name).element.bits


@pytest.mark.parametrize("name", FLOAT_REF)
def test_decode_table_equals_reference(name):
    dt = REFERENCE[name]
    n = 2 ** bits_of(name)
    codes = np.arange(n, dtype=np.uint16 if n > 256 else np.uint8)
    with np.errstate(invalid="ignore"):  # NaN codes
        ref = codes.astype(np.uint8 if np.dtype(dt).itemsize == 1 else np.uint16).view(dt).astype(np.float64)
    ours = decode_table(get_format(name).element, torch.float64).numpy()
    assert_bitwise(torch.from_numpy(ours), torch.from_numpy(ref), name)


def test_figures_match_ml_dtypes_finfo():
    for name in FLOAT_REF:
        e = get_format(name).element
        fi = ml_dtypes.finfo(REFERENCE[name])
        assert e.max == float(fi.max), name
        if name != "e8m0":
            assert e.min_normal == float(fi.smallest_normal), name
            assert e.min_subnormal == float(fi.smallest_subnormal), name
        assert e.mbits == fi.nmant, name


@pytest.mark.parametrize("saturate", [True, False], ids=["saturate", "overflow"])
@pytest.mark.parametrize("name", FLOAT_REF)
def test_cast_adversarial_and_random_equals_reference(name, saturate):
    fmt = get_format(name).with_(saturate=saturate)
    e = fmt.element
    grid = decode_table(e, torch.float64).numpy()
    grid = grid[np.isfinite(grid)]
    rng = np.random.default_rng(0)
    with np.errstate(over="ignore"):  # e.max * 4 overflows float32 for bf16 and e8m0: inf is a test value
        rand = np.concatenate([
            rng.standard_normal(20000) * e.max / 4,
            rng.standard_normal(5000) * e.min_normal,
            np.exp(rng.uniform(math.log(e.min_subnormal / 4), math.log(e.max * 4), 20000)),
        ]).astype(np.float32)  # fmt: skip
        x = np.concatenate([adversarial_f32(grid, e.max), rand, -rand])
    ours = cast(torch.from_numpy(x), fmt).numpy()
    finite = np.isfinite(x)
    if name == "e8m0":
        # ml_dtypes rounds float32 *subnormal* inputs to E8M0 upward (1.4·2^-127 -> 2^-126); numcast
        # rounds them to nearest like every other input (checked in test_e8m0_ties_round_up_like_ml_dtypes).
        finite &= ~((np.abs(x) < 2.0**-126) & (x != 0))
    ref = ref_values(name, x[finite], saturate)
    assert_bitwise(torch.from_numpy(ours[finite]), torch.from_numpy(ref), f"{name} finite inputs")


@pytest.mark.parametrize("name", FLOAT_REF)
def test_non_finite_inputs_follow_policy(name):
    """NaN stays NaN; inf stays inf where the format has inf, else NaN. Deliberate deviation from
    ml_dtypes, which turns NaN into −0 and inf into ±max for FP6/FP4: a finite value would hide the fault."""
    e = get_format(name).element
    out = cast(torch.tensor([math.nan, math.inf, -math.inf]), name)
    assert math.isnan(out[0])
    if e.has_inf:
        assert out[1].item() == math.inf and out[2].item() == -math.inf
    else:
        assert math.isnan(out[1]) and math.isnan(out[2])


@pytest.mark.parametrize("name", UNSCALED)
def test_every_code_round_trips(name):
    """decode → cast → encode gives back every code (NaN codes give a NaN code); exhaustive."""
    e = get_format(name).element
    codes = torch.arange(2**e.bits)
    vals = decode(codes, e, torch.float64)
    keep = ~torch.isnan(vals)
    recast = cast(vals[keep], name)
    assert_bitwise(recast, vals[keep], f"{name}: representable values are fixed points")
    back = encode(recast, e).long()
    assert torch.equal(back, codes[keep]), f"{name}: codes do not round-trip"
    if e.has_nan:
        nan_codes = encode(vals[~keep], e).long()
        assert torch.isnan(decode(nan_codes, e, torch.float64)).all()


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("signed", [True, False])
def test_integer_cast_equals_numpy(bits, signed):
    name = f"{'' if signed else 'u'}int{bits}"
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    halves = np.arange(2 * lo - 4, 2 * hi + 5) / 2  # every tie
    x = np.concatenate([halves, np.nextafter(halves, np.inf), np.nextafter(halves, -np.inf)]).astype(np.float32)
    ref = np.clip(np.round(x), lo, hi) + 0.0  # numpy rounds half to even; integers have no -0
    assert_bitwise(cast(torch.from_numpy(x), name), torch.from_numpy(ref.astype(np.float32)), name)


def test_e8m0_ties_round_up_like_ml_dtypes():
    x = torch.tensor([1.5, 3.0, 6.0, 0.75, 2.0**-128, 1.4 * 2.0**-127, 1.5 * 2.0**-127, 0.0, -1.0])
    out = cast(x, "e8m0").tolist()
    assert out[:7] == [2.0, 4.0, 8.0, 1.0, 2.0**-127, 2.0**-127, 2.0**-126]
    assert math.isnan(out[7]) and math.isnan(out[8])  # no zero, unsigned


def test_fnuz_has_no_negative_zero():
    out = cast(torch.tensor([-0.0, -1e-30]), "fp8_e4m3fnuz")
    assert not torch.signbit(out).any()


def test_custom_minifloat_from_parameters_matches_ml_dtypes():
    # e3m4 (ieee) and e4m3 with bias 11 (fnuz) are built from parameters, not from named entries
    for name, spec in [("e3m4_ieee", "e3m4_ieee"), ("e4m3b11_fnuz", "e4m3b11fnuz")]:
        fmt = get_format(spec)
        dt = REFERENCE[name]
        assert fmt.element.max == float(ml_dtypes.finfo(dt).max), name


def _every_binade_f32() -> torch.Tensor:
    """Float32 inputs from every exponent field (0…255, so subnormals, inf and NaN too), both signs: random
    mantissas plus a one-bit mantissa at every position and its neighbours (the ties of every grid step)."""
    rng = np.random.default_rng(1)
    one_bit = np.array([1 << s for s in range(23)], dtype=np.int64)
    mant = np.unique(np.concatenate([rng.integers(0, 1 << 23, 64), one_bit, one_bit - 1, one_bit + 1, [0]]))
    bits = (np.arange(256, dtype=np.int64)[:, None] << 23 | mant[None, :]).ravel()
    bits = np.concatenate([bits, bits | (1 << 31)]).astype(np.uint32)
    return torch.from_numpy(bits.view(np.float32).copy())


ARITHMETIC = [f.name for f in list_formats() if not f.scaling.scaled and not isinstance(f.element, IntElement)]


@pytest.mark.parametrize("saturate", [True, False], ids=["saturate", "overflow"])
@pytest.mark.parametrize("name", ARITHMETIC)
def test_arithmetic_rounding_equals_exponent_bits(name, saturate):
    """The compiled kernels' rounding (Veltkamp split + magic number, no bit casts) gives the bits of the
    exponent-bit rounding on every float32 binade, wherever ``arithmetic_rounding_exact`` says it applies."""
    e = get_format(name).element
    for dtype in (torch.float32, torch.float64):
        if not arithmetic_rounding_exact(e, dtype):
            continue
        x = _every_binade_f32().to(dtype)
        x = torch.cat([x, x * 2.0**-60, x * 2.0**60]) if dtype == torch.float64 else x
        ours = cast_element(x, e, saturate=saturate, arithmetic=True)
        assert_bitwise(ours, cast_element(x, e, saturate=saturate, arithmetic=False), f"{name} {dtype}")


@pytest.mark.parametrize("name", [n for n in ARITHMETIC if arithmetic_rounding_exact(get_format(n).element,
                                                                                 torch.float32)])  # fmt: skip
def test_arithmetic_rounding_equals_exponent_bits_on_every_float32_of_its_edge_binades(name):
    """Every float32 of the lowest normal binade (where the subnormal step takes over) and of the top binade
    (where values round up beyond the grid): Veltkamp's split rounds ties to even for this m."""
    e = get_format(name).element
    mant = torch.arange(1 << 23, dtype=torch.float32) * 2.0**-23 + 1.0
    x = torch.cat([mant * 2.0**e.emin, mant * 2.0**e.emax])
    assert_bitwise(cast_element(x, e, arithmetic=True), cast_element(x, e, arithmetic=False), name)


@pytest.mark.parametrize("name", ARITHMETIC)
def test_grid_step_is_the_clamped_binade_spacing(name):
    """The eager cast's grid spacing (the exponent field clamped in place) is the definition's
    2^(clamp(floor(log2|y|), emin, emax + 1) − mbits) on every float32 exponent field (±0, subnormals, ±inf, NaN
    included), in the work dtype and in float64."""
    e = get_format(name).element
    x = _every_binade_f32()
    for dtype in {work_dtype(e), torch.float64}:
        y = x.to(dtype)
        want = pow2(floor_log2(y).clamp(e.emin, e.emax + 1) - e.mbits, dtype)
        assert_bitwise(grid_step(y, e), want, f"{name} {dtype}")


def test_arithmetic_rounding_applies_to_the_common_formats():
    """Guards the test above against testing nothing: the formats the fast kernels serve take the path."""
    for name in ("fp8_e4m3", "fp8_e5m2", "fp6_e2m3", "fp6_e3m2", "fp4_e2m1", "bf16", "fp16"):
        e = get_format(name).element
        assert arithmetic_rounding_exact(e, work_dtype(e)), name


PATTERN_ENCODED = [(n, d) for n in UNSCALED for d in (torch.float32, torch.float64)
                   if pattern_codes(get_format(n).element, d) is not None]  # fmt: skip


@pytest.mark.parametrize(("name", "dtype"), PATTERN_ENCODED)
def test_pattern_encode_gives_every_finite_code(name, dtype):
    """``encode`` by bit patterns gives back the code of every finite grid value in the work dtype, signed zeros
    included (``fnuz``: −0, which rounding produces, is +0's code), both on its finite path and on its general
    path (a NaN beside the same values, whose positions are masked)."""
    e = get_format(name).element
    codes = torch.arange(2**e.bits)
    vals = decode(codes, e, dtype)
    finite = torch.isfinite(vals)
    want = codes[finite]
    assert torch.equal(encode(vals[finite], e).long(), want), name
    if e.policy == "fnuz":
        assert int(encode(torch.tensor([-0.0], dtype=dtype), e)) == 0
    if e.has_nan:
        mixed = torch.cat([vals[finite], torch.tensor([math.nan], dtype=dtype)])
        assert torch.equal(encode(mixed, e).long()[:-1], want), f"{name}: general path"


def test_pattern_encode_covers_the_block_formats_elements():
    """Guards the tests above against testing nothing: the elements and scale formats of the block formats."""
    covered = {n for n, _ in PATTERN_ENCODED}
    assert {"fp4_e2m1", "fp6_e2m3", "fp6_e3m2", "fp8_e4m3", "fp8_e5m2"} <= covered
    assert pattern_codes(get_format("mxfp4").scaling.scale_format, torch.float64) is not None  # E8M0 scales


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_all_finite_sees_every_nan_and_inf_wherever_it_is(dtype):
    """The check that lets eager casts and encoders skip their non-finite masks: one NaN, +inf or -inf at any
    position (first, last, the middle, beside a NaN of the other sign) makes it False; empty and finite are True."""
    x = torch.randn(257, generator=torch.Generator().manual_seed(3)).to(dtype)
    assert all_finite(x) and all_finite(x[:0]) and all_finite(torch.tensor([torch.finfo(dtype).max], dtype=dtype))
    for bad in (math.nan, math.inf, -math.inf):
        for pos in (0, 128, 256):
            y = x.clone()
            y[pos] = bad
            assert not all_finite(y), (bad, pos)
    y = x.clone()
    y[5], y[9] = -math.inf, math.inf  # lo = -inf, hi = +inf
    assert not all_finite(y)
