"""The battery every registered format runs through (the ml_dtypes test design): adding a format to the
registry subjects it to all of these checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import assert_bitwise
from hypothesis import given, settings
from hypothesis import strategies as st

from numcast.formats.layout import Layout
from numcast.formats.ops import cast, quantize
from numcast.formats.qtensor import QTensor
from numcast.formats.registry import list_formats

FORMATS = [f.name for f in list_formats()]
BLOCK_FORMATS = [f.name for f in list_formats() if f.scaling.granularity == "block"]
by_name = {f.name: f for f in list_formats()}


def sample(fmt, shape=(6, 96), seed=0) -> torch.Tensor:
    """Random values spanning the format's range (positive only for unsigned unscaled formats)."""
    g = torch.Generator().manual_seed(seed)
    e = fmt.element
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape[0], 1, generator=g) * 2)
    if not fmt.scaling.scaled:
        x = x / x.abs().max() * e.max * 0.9
        if e.kind == "float" and e.policy == "fnu" or (e.kind == "int" and not e.signed):
            x = x.abs()
    return x


def representable_bounds(fmt, qt: QTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lowest, highest) representable value at each element position (element range × its scale)."""
    e = fmt.element
    lo_e = 0.0 if not e.signed else -e.max
    if not fmt.scaling.scaled:
        return torch.full(qt.shape, lo_e, dtype=torch.float64), torch.full(qt.shape, e.max, dtype=torch.float64)
    if fmt.scaling.sub_block_size:  # shared microexponents: each sub-block has its own scale 2^(E − τ)
        s = qt.element_scales()
        return lo_e * s, e.max * s
    lay = Layout.of(qt.shape, fmt.scaling)
    s = qt.scales().reshape(-1)
    if qt.tensor_scale is not None:
        s = s * qt.tensor_scale
    width = lay.to_rows(torch.zeros(qt.shape)).shape[1]
    if fmt.scaling.zero_point:
        z = qt.zero_point.reshape(-1).double()
        lo, hi = -z * s, (e.qmax - z) * s
    else:
        lo, hi = lo_e * s, e.max * s

    def spread(v):
        return lay.from_rows(v[:, None].expand(-1, width)).reshape(qt.shape)

    return spread(lo), spread(hi)


def strictly_inside(fmt, x: torch.Tensor) -> torch.Tensor:
    lo, hi = representable_bounds(fmt, quantize(x, fmt))
    xd = x.double()
    margin = (hi - lo).abs() * 2**-20
    inside = (xd > lo + margin) & (xd < hi - margin)
    if fmt.element.kind == "float" and fmt.element.policy == "fnu":
        inside &= xd >= fmt.element.min_normal
    return inside


@pytest.mark.parametrize("name", FORMATS)
def test_shape_and_dtype_preserved(name):
    for shape in [(5,), (3, 7), (2, 3, 40)]:
        x = sample(by_name[name], (int(np.prod(shape[:-1])), shape[-1])).reshape(shape)
        y = cast(x, name)
        assert y.shape == x.shape and y.dtype == x.dtype


@pytest.mark.parametrize("name", FORMATS)
def test_idempotent(name):
    fmt = by_name[name]
    x = sample(fmt)
    once = cast(x, name)
    twice = cast(once, name)
    if fmt.scaling.tensor_scale:
        # Two-level (NVFP4): x̂ = fp32(q·s_b·s_t) has up to 30 significant bits, so re-deriving the FP32
        # tensor scale from x̂ can move it by an ulp; values then agree to float32 precision, codes exactly.
        assert torch.allclose(twice, once, rtol=2.0**-22, atol=0)
        assert torch.equal(quantize(once, name).codes, quantize(x, name).codes)
    else:
        assert_bitwise(twice, once, name)


@pytest.mark.parametrize("name", FORMATS)
def test_quantize_pack_unpack_dequantize_equals_cast(name):
    fmt = by_name[name]
    x = sample(fmt, (4, 100))  # 100 is not a multiple of any block size: padding is exercised
    qt = quantize(x, name)
    again = QTensor.unpack(qt.pack(), fmt, qt.shape, qt.dtype)
    assert torch.equal(again.codes.long(), qt.codes.long())
    assert_bitwise(again.dequantize(), cast(x, name), name)
    assert len(qt.pack()) == qt.nbytes


@pytest.mark.parametrize("name", FORMATS)
def test_storage_size_matches_bits_per_value(name):
    fmt = by_name[name]
    b = fmt.block_size or 1
    n_rows, n_cols = 8, 4 * max(b, 8)
    qt = quantize(sample(fmt, (n_rows, n_cols)), name)
    expected_bits = fmt.bits_per_value * n_rows * n_cols
    g = fmt.scaling.granularity
    if g == "channel":
        expected_bits += fmt.scaling.scale_format.bits * n_rows * (2 if fmt.scaling.zero_point else 1)
    elif g == "tensor":
        expected_bits += fmt.scaling.scale_format.bits * (1 + fmt.scaling.zero_point)
    if fmt.scaling.tensor_scale:
        expected_bits += 32
    assert qt.nbytes == math.ceil(expected_bits / 8)


@pytest.mark.parametrize("name", FORMATS)
def test_directed_rounding_brackets_nearest_and_input(name):
    fmt = by_name[name]
    x = sample(fmt, seed=1)
    lo, near, hi = (cast(x, name, rounding=m) for m in ("floor", "nearest_even", "ceil"))
    assert (lo <= near).all() and (near <= hi).all()
    inside = strictly_inside(fmt, x)
    assert inside.float().mean() > 0.5
    assert (lo[inside] <= x[inside]).all() and (x[inside] <= hi[inside]).all()
    if not fmt.scaling.zero_point and not (fmt.element.kind == "float" and fmt.element.policy == "fnu"):
        assert (cast(x, name, rounding="toward_zero").abs() <= x.abs()).all()


@pytest.mark.parametrize("name", FORMATS)
def test_nearest_away_differs_from_even_only_at_ties(name):
    fmt = by_name[name]
    x = sample(fmt, seed=2)
    even, away = cast(x, name), cast(x, name, rounding="nearest_away")
    diff = even != away
    # where they differ, both are equally far from x (a tie) and `away` has the larger magnitude
    assert torch.allclose((even[diff] - x[diff]).abs(), (away[diff] - x[diff]).abs(), rtol=1e-6)
    assert (away[diff].abs() >= even[diff].abs()).all()


@pytest.mark.parametrize("name", FORMATS)
def test_stochastic_rounding_is_reproducible_and_unbiased(name):
    fmt = by_name[name]
    row = sample(fmt, (1, 64), seed=3)
    x = row.expand(4000, -1).contiguous()  # identical rows: identical scales along the block axis
    a = cast(x, name, rounding="stochastic", generator=torch.Generator().manual_seed(7))
    b = cast(x, name, rounding="stochastic", seed=7)
    assert_bitwise(a, b, "same seed")
    c = cast(x, name, rounding="stochastic", seed=8)
    assert not torch.equal(a, c)
    lo, hi = cast(x[:1], name, rounding="floor")[0], cast(x[:1], name, rounding="ceil")[0]
    inside = strictly_inside(fmt, row)[0]
    step = (hi - lo).double()
    mean = a.double().mean(0)
    se = step / 2 / math.sqrt(x.shape[0])
    ok = (mean - row[0].double()).abs() <= 5 * se + 1e-12 * row[0].abs().double()
    assert ok[inside].all(), f"biased at {torch.nonzero(~ok & inside)[:5].tolist()}"
    assert ((a >= lo) & (a <= hi)).all()


@pytest.mark.parametrize("name", FORMATS)
def test_half_precision_inputs_equal_float32_path_rounded(name):
    fmt = by_name[name]
    x32 = sample(fmt, seed=4)
    for dt in (torch.bfloat16, torch.float16):
        x = x32.to(dt)
        if not torch.isfinite(x).all():
            continue
        assert_bitwise(cast(x, name), cast(x.float(), name).to(dt), f"{name} {dt}")


@pytest.mark.parametrize("name", BLOCK_FORMATS)
def test_blocks_along_another_axis_equal_transposed_cast(name):
    fmt = by_name[name]
    from dataclasses import replace

    on_rows = fmt.with_(scaling=replace(fmt.scaling, axis=0))
    x = sample(fmt, (70, 5), seed=5)
    assert_bitwise(cast(x, on_rows), cast(x.t().contiguous(), fmt).t(), name)


@pytest.mark.parametrize("name", BLOCK_FORMATS)
def test_padding_equals_explicit_zero_padding(name):
    fmt = by_name[name]
    x = sample(fmt, (3, 3 * fmt.block_size + 5), seed=6)
    pad = fmt.block_size - 5 % fmt.block_size
    padded = torch.nn.functional.pad(x, (0, pad))
    assert_bitwise(cast(x, name), cast(padded, name)[:, : x.shape[1]], name)
    assert quantize(x, name).scale_codes.shape == (3, 4)


@pytest.mark.parametrize("name", FORMATS)
def test_safetensors_round_trip(name, tmp_path):
    fmt = by_name[name]
    x = sample(fmt, (3, 50), seed=7)
    qt = quantize(x, name)
    path = tmp_path / "q.safetensors"
    qt.save(path)
    back = QTensor.load(path)
    assert back.format == fmt and back.shape == qt.shape
    assert_bitwise(back.dequantize(), cast(x, name), name)


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(FORMATS),
    vals=st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1, max_size=70),
)
def test_property_idempotence_and_round_trip_on_arbitrary_values(name, vals):
    fmt = by_name[name]
    x = torch.tensor(vals, dtype=torch.float32)
    if fmt.element.kind == "float" and fmt.element.policy == "fnu":
        x = x.abs() + 1e-30
    y = cast(x, name)
    assert y.shape == x.shape
    if not fmt.scaling.tensor_scale:
        assert_bitwise(cast(y, name), y, name)
    qt = quantize(x, name) if torch.isfinite(y).all() or fmt.element.has_nan or fmt.scaling.scaled else None
    if qt is not None:
        assert_bitwise(QTensor.unpack(qt.pack(), fmt, qt.shape).dequantize(), y, name)


@pytest.mark.parametrize("name", FORMATS)
def test_chunked_eager_path_equals_whole_tensor_path(name, monkeypatch):
    """Large tensors are cast in row chunks; the bits must not depend on it."""
    from numcast.formats import ops

    fmt = by_name[name]
    x = sample(fmt, (40, 96), seed=8)
    whole = cast(x, name)
    monkeypatch.setattr(ops, "CHUNK_ELEMENTS", 100)
    assert_bitwise(cast(x, name), whole, name)
    if fmt.scaling.granularity == "block":
        from dataclasses import replace

        on_rows = fmt.with_(scaling=replace(fmt.scaling, axis=0))
        monkeypatch.setattr(ops, "CHUNK_ELEMENTS", 1 << 20)
        ref = cast(x.t().contiguous(), on_rows)
        monkeypatch.setattr(ops, "CHUNK_ELEMENTS", 100)
        assert_bitwise(cast(x.t().contiguous(), on_rows), ref, f"{name} axis 0")


@pytest.mark.parametrize("name", FORMATS)
def test_quantize_in_slices_equals_the_whole_tensor(name, monkeypatch):
    """Large tensors are quantized in slices along the first axis where their scales allow it; every stored part
    (codes, scales, zero points, sub-block offsets) must equal the whole tensor's, bit for bit. NaN/inf values are
    in the input where the format stores them (a scaled format's NaN block), so their encoding is sliced too."""
    from numcast.formats import ops

    fmt = by_name[name]
    x = sample(fmt, (40, 96), seed=9)
    if fmt.scaling.scaled or fmt.element.has_nan:
        x[3, 5], x[17, 40] = float("nan"), float("inf")
    whole = quantize(x, name)
    monkeypatch.setattr(ops, "CHUNK_ELEMENTS", 200)  # slices of 2 rows
    sliced = quantize(x, name)
    expect_slices = fmt.scaling.granularity != "tensor"
    assert (ops._independent_slices(x, fmt, fmt.rounding) is not None) == expect_slices, name
    for part in ("codes", "scale_codes", "zero_point", "sub_offsets"):
        a, b = getattr(whole, part), getattr(sliced, part)
        assert (a is None) == (b is None), part
        if a is not None:
            assert torch.equal(a, b), f"{name} {part}"
    assert sliced.shape == whole.shape and sliced.tensor_scale == whole.tensor_scale
    assert_bitwise(sliced.dequantize(), cast(x, name), name)
    out = torch.full_like(x, 7.0)  # quantize(out=): the cast's values as well, slice by slice, no second decode
    assert torch.equal(quantize(x, name, out=out).codes, whole.codes)
    assert_bitwise(out, cast(x, name), f"{name} out= (sliced)")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", FORMATS)
def test_nonfinite_inputs_follow_one_policy_in_cast_quantize_and_the_file(name, bad, tmp_path):
    """The non-finite policy, the same everywhere: ``cast`` never hides a non-finite value (NaN stays NaN, inf
    stays inf where the format has inf, a scaled block holding one is NaN); ``quantize`` stores exactly what
    ``cast`` returns, through the packed bytes and the saved file, or refuses with ``ValueError`` where the
    format has no code for it (unscaled integers, FP4/FP6)."""
    fmt = by_name[name]
    x = sample(fmt, (4, 64), seed=11)
    x[1, 5] = bad
    y = cast(x, name)
    assert not torch.isfinite(y[1, 5])
    try:
        qt = quantize(x, name)
    except ValueError as exc:
        assert not fmt.scaling.scaled and not fmt.element.has_nan, f"{name}: refused although it has a code: {exc}"
        assert "cannot be encoded" in str(exc)
        return
    assert_bitwise(qt.dequantize(), y, name)
    out = torch.zeros_like(x)
    quantize(x, name, out=out)
    assert_bitwise(out, y, f"{name} out=")
    qt.save(tmp_path / "q.safetensors")
    assert_bitwise(QTensor.load(tmp_path / "q.safetensors").dequantize(), y, name)


@pytest.mark.parametrize("name", FORMATS)
def test_the_finite_fast_path_gives_the_same_bits(name, monkeypatch):
    """Eager casts of large tensors check once that they are finite and then skip the non-finite selects
    (``element.FINITE_CHECK_MIN``): with the check forced on for every tensor and off for every tensor, cast and
    quantize give the same bits, on finite inputs and on inputs holding NaN/inf (which must take the selects)."""
    from numcast.formats import element

    fmt = by_name[name]
    x = sample(fmt, (8, 96), seed=5)
    bad = x.clone()
    if fmt.scaling.scaled or fmt.element.has_nan:
        bad[1, 3], bad[6, 70] = float("nan"), float("-inf")
    else:
        bad[1, 3] = float("inf")
    for t in (x, bad):
        got = {}
        for limit in (0, 1 << 62):
            monkeypatch.setattr(element, "FINITE_CHECK_MIN", limit)
            got[limit] = cast(t, name, backend="eager")
        assert_bitwise(got[0], got[1 << 62], name)
    monkeypatch.setattr(element, "FINITE_CHECK_MIN", 0)
    fast = quantize(x, name)
    monkeypatch.setattr(element, "FINITE_CHECK_MIN", 1 << 62)
    assert torch.equal(fast.codes, quantize(x, name).codes)
