"""Block-scaled formats against independent references written here from the specs (numpy + ml_dtypes),
on random and adversarial blocks: all-zero blocks, NaN/inf inside a block, block maxima at and just below
powers of two, values near 1e-40 and near 1e38."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from helpers import adversarial_blocks, assert_bitwise

from numcast.formats.ops import cast, quantize
from numcast.formats.registry import get_format

MX_ELEMENTS = {  # OCP MX v1.0 Table 1: element dtype, emax_elem, max
    "mxfp8_e4m3": (ml_dtypes.float8_e4m3fn, 8, 448.0),
    "mxfp8_e5m2": (ml_dtypes.float8_e5m2, 15, 57344.0),
    "mxfp6_e2m3": (ml_dtypes.float6_e2m3fn, 2, 7.5),
    "mxfp6_e3m2": (ml_dtypes.float6_e3m2fn, 4, 28.0),
    "mxfp4": (ml_dtypes.float4_e2m1fn, 2, 6.0),
    "mxint8": (None, 0, 127 / 64),
}


def mx_reference(x: np.ndarray, name: str, block: int = 32) -> np.ndarray:
    """OCP MX v1.0 §6.3 quantize-dequantize along the last axis, written from the spec.

    X = 2^(floor(log2 amax) − emax_elem) with floor(log2) from frexp, clamped to E8M0's [−127, 127]
    (all-zero block: log2(0) = −inf → −127); a block containing NaN or inf gets the NaN scale; elements
    P_i = x_i / X cast to the element type with saturation (MXINT8: k·2^−6, k ∈ [−127, 127], RNE)."""
    dt, emax, emax_val = MX_ELEMENTS[name]
    xb = x.astype(np.float64).reshape(-1, block)
    out = np.empty_like(xb)
    for i, row in enumerate(xb):
        amax = np.max(np.abs(row))
        if not np.isfinite(amax):
            out[i] = np.nan
            continue
        e = np.frexp(amax)[1] - 1 - emax if amax > 0 else -127
        e = int(np.clip(e, -127, 127))
        p = (row / 2.0**e).astype(np.float32)  # exact: power of two
        p = np.clip(p, -emax_val, emax_val)
        if dt is None:
            q = np.clip(np.round(p.astype(np.float64) * 64), -127, 127) / 64 + 0.0  # integers have no -0
        else:
            q = p.astype(dt).astype(np.float64)
        out[i] = q * 2.0**e
    return out.reshape(x.shape).astype(np.float32)


def nvfp4_reference(x: np.ndarray) -> np.ndarray:
    """NVFP4 as numcast documents it (NVIDIA's two-level recipe): s_t = fp32(amax_t/(6·448));
    s_b = e4m3(amax_b/(6·s_t)) saturating, 0 → 2^−9; y = x/(s_b·s_t); x̂ = fp32(e2m1(y)·s_b·s_t)."""
    xb = x.astype(np.float64).reshape(-1, 16)
    amax_t = np.max(np.abs(xb))
    if not np.isfinite(amax_t):
        return np.full(x.shape, np.nan, np.float32)
    s_t = np.float64(np.float32(amax_t / (6 * 448))) if amax_t > 0 else 1.0
    if s_t == 0:
        s_t = 2.0**-149
    out = np.empty_like(xb)
    for i, row in enumerate(xb):
        amax_b = np.max(np.abs(row))
        s_b = float(np.array(min(amax_b / (6 * s_t), 448.0)).astype(ml_dtypes.float8_e4m3fn).astype(np.float64))
        s_b = s_b if s_b > 0 else 2.0**-9
        s = s_b * s_t
        y = np.clip(row / s, -6, 6).astype(np.float32)
        out[i] = y.astype(ml_dtypes.float4_e2m1fn).astype(np.float64) * s
    return out.reshape(x.shape).astype(np.float32)


def random_blocks(block: int, rng: np.random.Generator, n: int = 400) -> np.ndarray:
    scale = np.exp(rng.uniform(-20, 20, (n, 1)))
    return (rng.standard_normal((n, block)) * scale).astype(np.float32)


@pytest.mark.parametrize("name", sorted(MX_ELEMENTS))
def test_mx_equals_ocp_reference(name):
    rng = np.random.default_rng(1)
    with np.errstate(all="ignore"):
        x = np.concatenate([adversarial_blocks(32, rng), random_blocks(32, rng)])
        ref = mx_reference(x, name)
    assert_bitwise(cast(torch.from_numpy(x), name), torch.from_numpy(ref), name)


def test_mxfp8_e4m3_floor_rule_saturates_957_to_896():
    out = cast(torch.full((32,), 957.0), "mxfp8_e4m3")
    assert out[0].item() == 896.0


def test_nvfp4_equals_two_level_reference():
    rng = np.random.default_rng(2)
    for x in (random_blocks(16, rng, 200), adversarial_blocks(16, rng)[1:-6], np.zeros((4, 16), np.float32)):
        with np.errstate(all="ignore"):
            ref = nvfp4_reference(x)
        assert_bitwise(cast(torch.from_numpy(x), "nvfp4"), torch.from_numpy(ref), "nvfp4")


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_nvfp4_nonfinite_value_makes_only_its_block_nan(bad):
    """The README's policy: a block holding NaN/inf is NaN; the other blocks (and the FP32 tensor scale, taken
    over the finite blocks) are what they are without it."""
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    x[1, 2] = bad
    y = cast(x, "nvfp4")
    assert torch.isnan(y[1]).all()
    keep = [0, 2, 3]
    assert_bitwise(y[keep], cast(x[keep], "nvfp4"), "nvfp4")


@pytest.mark.parametrize("bits,block", [(8, 16), (6, 16), (4, 16), (8, 32)])
def test_bfp_equals_shared_exponent_reference(bits, block):
    """Block floating point: shared exponent floor(log2 amax) (E8M0), b-bit sign-magnitude mantissa with
    b−2 fraction bits, symmetric range ±(2^{b−1}−1)·2^{−(b−2)}."""
    rng = np.random.default_rng(3)
    x = random_blocks(block, rng, 300)
    xb = x.astype(np.float64)
    amax = np.abs(xb).max(axis=1, keepdims=True)
    e = np.frexp(amax)[1] - 1
    step = 2.0 ** (e - (bits - 2))
    k = np.clip(np.round(xb / step), -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
    ref = (k * step + 0.0).astype(np.float32)  # integer mantissas have no -0
    assert_bitwise(cast(torch.from_numpy(x), f"bfp{bits}_b{block}"), torch.from_numpy(ref), "bfp")
    if bits == 8 and block == 32:
        assert_bitwise(cast(torch.from_numpy(x), "mxint8"), torch.from_numpy(ref), "bfp8_b32 == mxint8")


@pytest.mark.parametrize("bits,group", [(4, 128), (3, 64), (8, 32), (2, 64)])
def test_grouped_int_equals_fp16_scale_reference(bits, group):
    """s = fp16(amax/qmax) (0 → 2^−24), q = clamp(round(x/s), −2^{b−1}, 2^{b−1}−1), x̂ = q·s (float32)."""
    rng = np.random.default_rng(4)
    x = random_blocks(group, rng, 200)
    x[0] = 0
    qmax = 2 ** (bits - 1) - 1
    s = np.abs(x.astype(np.float64)).max(axis=1, keepdims=True) / qmax
    s = np.minimum(s, 65504.0).astype(np.float16).astype(np.float32)  # saturate to fp16 max
    s[s == 0] = np.float32(2.0**-24)
    q = np.clip(np.round(x / s), -qmax - 1, qmax) + 0.0  # integers have no -0
    ref = (q * s).astype(np.float32)
    assert_bitwise(cast(torch.from_numpy(x), f"int{bits}_g{group}"), torch.from_numpy(ref), "int group")


def test_zero_point_uint_equals_asymmetric_reference():
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((50, 128)) + rng.uniform(-2, 2, (50, 1))).astype(np.float32)
    lo = np.minimum(x.min(axis=1, keepdims=True), 0).astype(np.float64)
    hi = np.maximum(x.max(axis=1, keepdims=True), 0).astype(np.float64)
    s = ((hi - lo) / 15).astype(np.float16).astype(np.float32)
    z = np.clip(np.round(-lo / s.astype(np.float64)), 0, 15).astype(np.float32)
    q = np.clip(np.round(x / s) + z, 0, 15)
    ref = ((q - z) * s).astype(np.float32)
    assert_bitwise(cast(torch.from_numpy(x), "uint4_g128_zp"), torch.from_numpy(ref), "uint4 zp")


def test_mx_scale_codes_are_e8m0():
    x = torch.tensor([[0.0] * 32, [1.0] * 32, [2.0**-140] * 32])
    qt = quantize(x, "mxfp8_e4m3")
    # shared exponents: zero block -> -127 (code 0); amax 1 -> 0 - 8 = -8 (code 119); tiny -> clamp -127
    assert qt.scale_codes.reshape(-1).tolist() == [0, 119, 0]
    x[1, 3] = float("nan")
    assert quantize(x, "mxfp8_e4m3").scale_codes.reshape(-1).tolist()[1] == 255


def test_scale_rules_ceil_never_saturates_and_nearest_rounds():
    fmt = get_format("mxfp8_e4m3")
    from dataclasses import replace

    ceil = fmt.with_(scaling=replace(fmt.scaling, rule="ceil"))
    nearest = fmt.with_(scaling=replace(fmt.scaling, rule="nearest"))
    x = torch.full((32,), 957.0)
    assert cast(x, ceil)[0].item() == 960.0  # scale 2^2 = ceil(957/448): 957/4 = 239.25 -> 240
    # 957/448 = 2.14 -> nearest power of two 2: 957/2 = 478.5 saturates to 448 -> 896
    assert cast(x, nearest)[0].item() == 896.0
    rng = np.random.default_rng(6)
    y = torch.from_numpy(random_blocks(32, rng, 300))
    qt = quantize(y, ceil)
    assert (quantize(y, ceil).codes & 0x7F).max() <= 0x7E  # no NaN codes
    s = qt.scales().float().repeat_interleave(32, dim=-1)
    assert (y.abs() <= 448 * s).all()
