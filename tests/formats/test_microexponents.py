"""Shared microexponents (MX9/MX6/MX4, Rouhani et al., ISCA 2023) against a reference written here from the
paper's definition (numpy, a plain loop over blocks and sub-blocks), every code's round trip, the stored
bits, the data model (validation, serialisation, user formats) and the CLI/README rows.

The paper's MX format with k1 = 16, d1 = 8, k2 = 2, d2 = 1: a block of 16 values shares an 8-bit exponent E,
each pair of values a 1-bit microexponent τ, and each value is a sign and an m-bit magnitude P (m = 7, 4, 2):
v = ±P · 2^(E − τ − (m − 1)). E is the largest element exponent floor(log2|v|) of the block; τ_j =
min(E − E_j, 2^d2 − 1) with E_j the largest exponent of sub-block j; P = round-half-even(|v| / step),
saturated to 2^m − 1.
"""

from __future__ import annotations

import math
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from helpers import adversarial_blocks, assert_bitwise

from numcast.formats.engine import grid_cast
from numcast.formats.ops import cast, cast_stats, quantize
from numcast.formats.qtensor import QTensor, storage_nbytes
from numcast.formats.registry import get_format, list_formats, parse_format, register_format
from numcast.formats.scale import Scales
from numcast.formats.spec import E8M0, FP16, FloatElement, Format, IntElement, Scaling

MX = {"mx9": 7, "mx6": 4, "mx4": 2}  # name -> mantissa (magnitude) bits m


def user_int(k1: int, k2: int, d2: int, m: int) -> Format:
    """A user's shared-microexponent format: m-bit sign-magnitude mantissas, blocks of k1, sub-blocks of k2
    with d2-bit offsets."""
    return Format(IntElement(m + 1, True, True, m - 1), Scaling("block", k1, -1, E8M0, "floor", sub_block_size=k2,
                                                                sub_offset_bits=d2))  # fmt: skip


USER = {  # name -> (format, k1, k2, d2, m)
    "k32_s4_d2_m3": (user_int(32, 4, 2, 3), 32, 4, 2, 3),
    "k16_s1_d3_m5": (user_int(16, 1, 3, 5), 16, 1, 3, 5),
    "k8_s4_d1_m1": (user_int(8, 4, 1, 1), 8, 4, 1, 1),
}


# ---- the reference, from the paper's definition ----------------------------------------------------------------


def exponent(a: float) -> float:
    """floor(log2 a) for a > 0 (frexp, exact in float64), −inf for 0."""
    return float(np.frexp(a)[1] - 1) if a > 0 else -math.inf


def reference(x: np.ndarray, k1: int, k2: int, d2: int, m: int):
    """(values, E per block, τ per sub-block, signed mantissas ±P) of float32 ``x`` [rows, L] (L a multiple of k1)
    in the MX format (k1, 8-bit E, k2, d2-bit τ, m-bit magnitudes). A block holding NaN/inf is NaN (E = NaN, τ = 0,
    P = 0), numcast's policy for every block format. E is clamped to E8M0's −127…127 and τ to E + 127 (numcast's
    choice at the bottom of the range, which the paper leaves open); a value that rounds to 0 is +0."""
    blocks = x.astype(np.float64).reshape(-1, k1)
    vals = np.zeros_like(blocks)
    e_out = np.zeros(len(blocks))
    tau_out = np.zeros((len(blocks), k1 // k2), dtype=np.int64)
    p_out = np.zeros(blocks.shape, dtype=np.int64)
    for b, block in enumerate(blocks):
        if not np.all(np.isfinite(block)):
            vals[b], e_out[b] = np.nan, np.nan
            continue
        e = max(exponent(abs(v)) for v in block)
        e = int(min(max(e, -127), 127)) if e > -math.inf else -127
        e_out[b] = e
        for j in range(k1 // k2):
            sub = block[j * k2 : (j + 1) * k2]
            e_j = max(exponent(abs(v)) for v in sub)
            tau = int(max(min(e - e_j, 2**d2 - 1, e + 127), 0))
            tau_out[b, j] = tau
            step = 2.0 ** (e - tau - (m - 1))
            for i, v in enumerate(sub):
                p = min(np.rint(abs(v) / step), 2**m - 1)  # np.rint: round half to even
                p_out[b, j * k2 + i] = int(p) * (-1 if v < 0 else 1)
                vals[b, j * k2 + i] = np.copysign(p, v) * step + 0.0
    return vals.reshape(x.shape).astype(np.float32), e_out, tau_out, p_out


def edge_blocks(k1: int, k2: int, m: int, rng: np.random.Generator) -> np.ndarray:
    """Blocks of k1 float32 values that stress both scale levels."""
    rows = [np.zeros(k1)]
    outlier = rng.standard_normal(k1) * 1e-3
    outlier[rng.integers(k1)] = 37.0  # one outlier: every other sub-block shifts as far as it can
    rows.append(outlier)
    one_zero_sub = rng.standard_normal(k1)
    one_zero_sub[:k2] = 0.0
    rows.append(one_zero_sub)
    for p in (-149, -140, -130, -127, -126, -125, -100, 0, 100, 126, 127):  # the E8M0 range's edges
        at = rng.standard_normal(k1) * 2.0**p / 4
        at[0] = 2.0**p
        rows.append(at)
    rows.append(rng.standard_normal(k1) * 1e-40)  # float32 subnormals
    small = np.full(k1, 2.0**-127)
    small[-1] = 2.0**-126  # smallest normal leads; the rest one power below: at τ's lower limit
    rows.append(small)
    rows.append(rng.standard_normal(k1) * 1e38)
    # ties: a leader 1.0 (E = 0) in every sub-block with half-steps of the τ = 0 grid beside it, then of the
    # τ = 1 grid (values in [0.5, 1), leader-free sub-blocks)
    width = max(k2, 2)
    ks = np.arange(2**m - 1)
    ties0 = np.ones((len(ks), width))
    ties0[:, 1] = (ks + 0.5) * 2.0 ** -(m - 1)
    ks = np.arange(2 ** (m - 1), 2**m)
    ties1 = np.full((len(ks), width), 0.5)
    ties1[:, 1] = (ks + 0.5) * 2.0**-m  # the last one rounds to 2^m (even): saturates
    for t in (ties0.reshape(-1), ties1.reshape(-1)):
        t = np.resize(t, -(-len(t) // k1) * k1).reshape(-1, k1)
        t[:, 0] = 1.0  # each block has its leader
        rows.extend(t)
        rows.extend(-t)
    sat = np.full(k1, 0.25)
    sat[0] = 2 - 2.0**-12  # rounds past (2^m − 1)·2^−(m−1): saturates
    sat[k2 : 2 * k2] = 1 - 2.0**-12  # a τ = 1 sub-block whose values round to 2^m · 2^−m: saturate too
    rows.append(sat)
    rows.extend(adversarial_blocks(k1, rng))  # NaN, ±inf, maxima at and below powers of two, 957 ...
    return np.array(rows, dtype=np.float32).reshape(-1, k1)


def check_against_reference(fmt: Format, k1: int, k2: int, d2: int, m: int, x: np.ndarray, msg: str) -> None:
    ref, e, tau, p = reference(x, k1, k2, d2, m)
    xt = torch.from_numpy(x)
    assert_bitwise(cast(xt, fmt), torch.from_numpy(ref), f"{msg}: values")
    qt = quantize(xt, fmt)
    assert_bitwise(qt.dequantize(), torch.from_numpy(ref), f"{msg}: dequantize")
    nan_block = np.isnan(e)
    e_code = np.where(nan_block, 255, np.nan_to_num(e) + 127).astype(np.int64)
    assert np.array_equal(qt.scale_codes.reshape(-1).long().numpy(), e_code), f"{msg}: shared exponents"
    assert np.array_equal(qt.sub_offsets.reshape(-1, k1 // k2).long().numpy(), tau), f"{msg}: microexponents"
    codes = (p & (2 ** (m + 1) - 1)).reshape(-1)  # two's complement of the signed mantissa, m + 1 bits
    assert np.array_equal(qt.codes.reshape(-1).long().numpy(), codes), f"{msg}: mantissa codes"


@pytest.mark.parametrize("name", list(MX))
def test_named_formats_equal_the_paper_reference_on_random_and_edge_blocks(name):
    m = MX[name]
    rng = np.random.default_rng(m)
    x = rng.standard_normal((64, 16)) * np.exp(rng.standard_normal((64, 1)) * 3)  # varied block magnitudes
    x[::3] *= np.exp(rng.standard_normal((22, 16)) * 2)  # and varied sub-block magnitudes
    x = np.concatenate([x, edge_blocks(16, 2, m, rng)]).astype(np.float32)
    check_against_reference(get_format(name), 16, 2, 1, m, x, name)


@pytest.mark.parametrize("name", list(USER))
def test_user_sub_block_sizes_and_offset_widths_equal_the_reference(name):
    fmt, k1, k2, d2, m = USER[name]
    rng = np.random.default_rng(k1 + k2)
    x = rng.standard_normal((48, k1)) * np.exp(rng.standard_normal((48, k1)) * 2.5)  # offsets of every width
    x = np.concatenate([x, edge_blocks(k1, k2, m, rng)]).astype(np.float32)
    check_against_reference(fmt, k1, k2, d2, m, x, name)


def test_float_elements_take_sub_block_offsets_too():
    """A user's FP4 (E2M1) block format with a 2-bit offset per sub-block of 8, against ml_dtypes: E =
    floor(log2 amax) − emax_elem (OCP), E_j likewise per sub-block, τ_j = min(E − E_j, 3, E + 127) ≥ 0, elements
    cast (saturating) to E2M1 at 2^(E − τ_j)."""
    fmt = Format(FloatElement(2, 1, 1, "finite"), Scaling("block", 32, -1, E8M0, "floor", sub_block_size=8,
                                                          sub_offset_bits=2))  # fmt: skip
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((40, 32)) * np.exp(rng.standard_normal((40, 32)) * 2)).astype(np.float32)
    ref = np.empty(x.shape)
    for b, block in enumerate(x.astype(np.float64)):
        e = int(np.clip(max(exponent(abs(v)) for v in block) - 2, -127, 127))
        for j in range(4):
            sub = block[8 * j : 8 * j + 8]
            tau = int(max(min(e - (max(exponent(abs(v)) for v in sub) - 2), 3, e + 127), 0))
            y = np.clip((sub / 2.0 ** (e - tau)).astype(np.float32), -6, 6)
            ref[b, 8 * j : 8 * j + 8] = y.astype(ml_dtypes.float4_e2m1fn).astype(np.float64) * 2.0 ** (e - tau)
    assert_bitwise(cast(torch.from_numpy(x), fmt), torch.from_numpy(ref.astype(np.float32)), "fp4 sub-blocks")


# ---- every code ------------------------------------------------------------------------------------------------


def code_blocks(m: int, rng: np.random.Generator, canonical: bool):
    """(mantissas ±P [n, 16], E codes [n], τ [n, 8]) covering every pair of mantissas in every offset.

    Canonical blocks are those the rule itself produces: every τ = 0 sub-block has a magnitude ≥ 2^(m−1) (its
    leading bit at the top), and each block has such a sub-block (its leader); τ = 1 sub-blocks hold any pair.
    The others take random codes, offsets and exponents."""
    ks = np.arange(-(2**m - 1), 2**m)
    pairs = np.stack(np.meshgrid(ks, ks, indexing="ij"), -1).reshape(-1, 2)
    if not canonical:
        n = len(pairs) // 8 + 1
        p = rng.choice(ks, (n, 16))
        e_code = rng.integers(0, 255, n)
        tau = rng.integers(0, 2, (n, 8)) * (e_code[:, None] > 0)  # τ ≤ E + 127
        return p, e_code, tau
    lead = pairs[np.abs(pairs).max(1) >= 2 ** (m - 1)]
    rng.shuffle(lead)
    rng.shuffle(pairs)
    subs = [(pr, 0) for pr in lead[len(lead) // 4 :]] + [(pr, 1) for pr in pairs]
    rng.shuffle(subs)
    leaders = lead[: len(lead) // 4]
    n = -(-len(subs) // 7)
    p, tau = np.zeros((n, 16), np.int64), np.ones((n, 8), np.int64)  # unused slots: zero pairs, τ = 1 (canonical)
    tau[:, 0] = 0
    for b in range(n):
        p[b, :2] = leaders[b % len(leaders)]
        for j, (pr, t) in enumerate(subs[7 * b : 7 * b + 7], start=1):
            p[b, 2 * j : 2 * j + 2], tau[b, j] = pr, t
    e_code = rng.choice([1, 2, 60, 126, 127, 128, 200, 253, 254], n)  # E = −126 … 127
    bottom = np.stack([leaders[i % len(leaders)] for i in range(8 * 8)]).reshape(8, 16)
    bottom[:, 2:] = rng.choice(ks, (8, 14))  # E = −127 (code 0): τ must be 0, and any pair is canonical there
    return np.concatenate([p, bottom]), np.concatenate([e_code, np.zeros(8, np.int64)]), np.concatenate(
        [tau, np.zeros((8, 8), np.int64)])  # fmt: skip


@pytest.mark.parametrize("canonical", [True, False])
@pytest.mark.parametrize("name", list(MX))
def test_every_code_decodes_to_the_paper_value_and_reencodes(name, canonical):
    """Every mantissa code (the 2^(m+1) − 1 values ±P; the two's-complement code of −2^m is the unused
    sign-magnitude −0) in every pair, both offsets, exponents across E8M0's range: decoding gives
    ±P·2^(E − τ − (m−1)); casting the decoded block gives it back (every representable block is a fixed
    point), and canonical blocks re-encode to the very same codes."""
    m, fmt = MX[name], get_format(name)
    p, e_code, tau = code_blocks(m, np.random.default_rng(m), canonical)
    n = len(p)
    codes = torch.from_numpy(p & (2 ** (m + 1) - 1)).to(torch.uint8)
    scale_codes = torch.from_numpy(e_code).to(torch.uint8).reshape(n, 1)
    qt = QTensor(codes, scale_codes, None, None, fmt, (n, 16), torch.float32, torch.from_numpy(tau).to(torch.uint8))
    e = (e_code - 127)[:, None] - np.repeat(tau, 2, axis=1)
    expect = (p * np.exp2((e - (m - 1)).astype(np.float64))).astype(np.float32)
    deq = qt.dequantize()
    assert_bitwise(deq, torch.from_numpy(expect), f"{name}: decode")
    assert_bitwise(cast(deq, fmt), deq, f"{name}: fixed point")
    again = quantize(deq, fmt)
    assert_bitwise(again.dequantize(), deq, f"{name}: re-encoded values")
    if canonical:
        assert torch.equal(again.codes, qt.codes), name
        assert torch.equal(again.scale_codes, qt.scale_codes), name
        assert torch.equal(again.sub_offsets, qt.sub_offsets), name


# ---- storage ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,bpv", [("mx9", 9.0), ("mx6", 6.0), ("mx4", 4.0)])
def test_bits_per_value_and_the_packed_layout(name, bpv, tmp_path):
    fmt, m = get_format(name), MX[name]
    assert fmt.bits_per_value == bpv == (m + 1) + 8 / 16 + 1 / 2
    qt = quantize(torch.randn(8, 64, generator=torch.Generator().manual_seed(1)), fmt)
    assert qt.bits_per_value == bpv and qt.nbytes == 8 * 64 * bpv / 8
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(2)) * 5  # 40: the last block is padded
    qt = quantize(x, fmt)
    n_codes, n_blocks = 3 * 40, 3 * 3
    assert qt.scale_codes.shape == (3, 3) and qt.sub_offsets.shape == (3, 24)  # 8 offsets per (padded) block
    code_bytes, scale_bytes, off_bytes = math.ceil(n_codes * (m + 1) / 8), n_blocks, math.ceil(n_blocks * 8 / 8)
    assert qt.nbytes == code_bytes + scale_bytes + off_bytes == storage_nbytes((3, 40), fmt)
    data = qt.pack()
    # the offsets, one bit each, LSB first, right after the codes and the scale bytes
    bits = np.unpackbits(np.frombuffer(data[code_bytes + scale_bytes :], np.uint8), bitorder="little")[: n_blocks * 8]
    assert np.array_equal(bits, qt.sub_offsets.reshape(-1).numpy())
    assert np.array_equal(np.frombuffer(data[code_bytes : code_bytes + scale_bytes], np.uint8),
                          qt.scale_codes.reshape(-1).numpy())  # fmt: skip
    back = QTensor.unpack(data, fmt, qt.shape)
    assert torch.equal(back.sub_offsets, qt.sub_offsets) and torch.equal(back.codes, qt.codes)
    assert_bitwise(back.dequantize(), cast(x, fmt), name)
    qt.save(tmp_path / "q.safetensors")
    loaded = QTensor.load(tmp_path / "q.safetensors")
    assert loaded.format == fmt and loaded.format.name == name
    assert_bitwise(loaded.dequantize(), cast(x, fmt), f"{name} file")


def test_element_scales_are_block_scale_times_the_sub_block_shift():
    x = torch.tensor([[4.0, 1.0, 0.5, 0.25] + [0.0] * 12])
    qt = quantize(x, "mx9")
    s = qt.element_scales()[0]
    assert s[0] == s[1] == 4.0 and torch.equal(s[2:4], torch.tensor([2.0, 2.0], dtype=torch.float64))
    assert torch.equal(qt.sub_offsets.reshape(-1)[:2].long(), torch.tensor([0, 1]))


# ---- data model ------------------------------------------------------------------------------------------------


def test_named_formats_are_data():
    for name, m in MX.items():
        fmt = get_format(name)
        assert fmt.element == IntElement(m + 1, True, True, m - 1)
        assert fmt.scaling == Scaling("block", 16, -1, E8M0, "floor", sub_block_size=2, sub_offset_bits=1)
        assert fmt.element.max == (2**m - 1) / 2 ** (m - 1) and fmt.element.mbits == m
        assert parse_format(name) == fmt and fmt in list_formats()
        assert Format.from_json(fmt.to_json()) == fmt
        f = fmt.figures()
        assert (f["sub_block_size"], f["sub_offset_bits"], f["block_size"]) == (2, 1, 16)
    assert "sub_block" not in get_format("mxfp4").to_json()  # formats without offsets serialise as before
    assert Format.from_json(get_format("mxfp4").to_json()) == get_format("mxfp4")
    assert get_format("mx9").with_(name=None).label == "int8nf6 b16@-1 e8m0:floor offset1b/2"


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(granularity="channel", sub_block_size=2, sub_offset_bits=1), "block granularity"),
        (dict(block_size=16, sub_block_size=3, sub_offset_bits=1), "divides"),
        (dict(block_size=16, sub_block_size=16, sub_offset_bits=1), "below the block size"),
        (dict(block_size=16, sub_block_size=2, sub_offset_bits=0), "offset bits"),
        (dict(block_size=16, sub_block_size=2, sub_offset_bits=9), "offset bits"),
        (dict(block_size=16, sub_offset_bits=1), "sub-block size"),
        (dict(block_size=16, sub_block_size=2, sub_offset_bits=1, rule="amax", scale_format=FP16), "power-of-two"),
    ],
)
def test_invalid_sub_block_scalings_are_refused(kw, match):
    kw = {"granularity": "block", "scale_format": E8M0, "rule": "floor", **kw}
    with pytest.raises(ValueError, match=match):
        Scaling(**kw)


def test_a_registered_user_format_joins_the_battery_list_and_casts_as_its_spec():
    fmt, k1, k2, d2, m = USER["k32_s4_d2_m3"]
    try:
        reg = register_format("my_mx_s4", fmt)
        assert reg in list_formats() and reg.bits_per_value == 4 + (8 + 8 * 2) / 32
        x = torch.randn(4, 64, generator=torch.Generator().manual_seed(9))
        assert_bitwise(cast(x, "my_mx_s4"), cast(x, fmt), "registered")
    finally:
        from numcast.formats import registry

        registry._REGISTRY.pop("my_mx_s4", None)


def test_fixed_scales_must_carry_the_offsets():
    x = torch.randn(2, 16)
    with pytest.raises(ValueError, match="sub-block exponent offsets"):
        grid_cast(x, get_format("mx6"), scales=Scales(torch.ones(2, dtype=torch.float64)))
    sub = torch.zeros(2, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match="not carry sub-block offsets"):
        grid_cast(x, get_format("mxfp4_b16"), scales=Scales(torch.ones(2, dtype=torch.float64), sub_offset=sub,
                                                            sub_block=16))  # fmt: skip


def test_ceil_rule_with_offsets_never_saturates():
    """With the ``ceil`` rule for both levels every value fits its sub-block's grid: nothing is clipped."""
    fmt = Format(IntElement(5, True, True, 3), Scaling("block", 16, -1, E8M0, "ceil", sub_block_size=2,
                                                       sub_offset_bits=1))  # fmt: skip
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(4)) * 3
    _, stats = cast_stats(x, fmt)
    assert stats["frac_saturated"] == 0.0
    _, stats = cast_stats(x, "mx6")  # the floor rule does clip some block maxima (pitfall 9's analogue)
    assert stats["frac_saturated"] > 0.0


@pytest.mark.parametrize("name", ["mx6", *USER])
def test_compiled_path_equals_the_paper_reference(name):
    """The compiled cast finds each element's offset from its sub-block neighbours and power-of-two thresholds
    (``scale.sub_block_factors``), not from the per-sub-block τ the eager cast computes: both against the
    paper's reference, on random and edge blocks, for sub-blocks of 1, 2 and 4 with 1- to 3-bit offsets (MX9
    and MX4 differ from MX6 only in the element width; compiling costs seconds)."""
    pytest.importorskip("torch._inductor")
    from numcast.formats.fused import compiler_available

    if not compiler_available("cpu"):
        pytest.skip("no C++ compiler for inductor")
    fmt, k1, k2, d2, m = (get_format(name), 16, 2, 1, MX[name]) if name in MX else USER[name]
    rng = np.random.default_rng(k1 * k2 + d2)
    x = rng.standard_normal((48, k1)) * np.exp(rng.standard_normal((48, k1)) * 2.5)
    x = np.concatenate([x, edge_blocks(k1, k2, m, rng)]).astype(np.float32)
    ref, *_ = reference(x, k1, k2, d2, m)
    xt = torch.from_numpy(x).reshape(-1, 2 * k1)  # two blocks per row: the kernel's rows are views
    assert_bitwise(cast(xt, fmt, backend="compiled"), torch.from_numpy(ref).reshape(xt.shape), name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_compiled_path_equals_eager_in_other_input_dtypes(dtype):
    """bfloat16 inputs run in float32, float64 ones in float64 (thresholds and scales of that dtype)."""
    from numcast.formats.fused import compiler_available

    if not compiler_available("cpu"):
        pytest.skip("no C++ compiler for inductor")
    rng = np.random.default_rng(0)
    x = torch.from_numpy(edge_blocks(16, 2, MX["mx6"], rng))
    x = torch.cat([x, torch.randn(32, 16, generator=torch.Generator().manual_seed(0))]).reshape(-1, 32).to(dtype)
    assert_bitwise(cast(x, "mx6", backend="compiled"), cast(x, "mx6", backend="eager"), str(dtype))


# ---- CLI and README --------------------------------------------------------------------------------------------


def test_formats_command_lists_them_and_the_readme_has_the_same_rows(capsys):
    from numcast.cli import main

    assert main(["formats", "--markdown"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [ln for ln in out if ln.split("|")[1:2] in ([" mx9 "], [" mx6 "], [" mx4 "])]
    assert [r.split("|")[2].strip() for r in rows] == ["9", "6", "4"]
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text().splitlines()
    for r in rows:
        assert r in readme, f"README's Formats table lacks {r!r}"
