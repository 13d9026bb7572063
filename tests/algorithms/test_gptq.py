"""GPTQ and RTN as functions of tensors: exact format members, the OBS property, and error vs RTN."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_bitwise

from numcast.algorithms.columns import ColumnQuantizer
from numcast.algorithms.gptq import gptq, hessian
from numcast.algorithms.rtn import rtn
from numcast.formats.ops import cast
from numcast.formats.registry import get_format

WEIGHT_FORMATS = ["mxfp4", "mxfp6_e2m3", "nvfp4", "int4_g128", "int3_g64", "mxint8", "int4_channel",
                  "fp8_e4m3", "uint4_g128_zp", "bfp4_b16", "fp8_e4m3_tensor"]  # fmt: skip


def correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Tokens whose features are strongly correlated (a low-rank mix plus noise), as real activations are."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(d // 4, d, generator=g)
    return torch.randn(n, d // 4, generator=g) @ basis + 0.1 * torch.randn(n, d, generator=g)


@pytest.mark.parametrize("name", WEIGHT_FORMATS)
def test_column_quantizer_without_updates_is_rtn(name):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 200, generator=g)
    cq = ColumnQuantizer(w, get_format(name))
    cols = []
    for j in range(w.shape[1]):
        if cq.needs_scales(j):
            cq.fix_block(j, w[:, j : j + cq.block])
        cols.append(cq.quantize(w[:, j], j))
    ref = cast(w, name)
    assert_bitwise(torch.stack(cols, dim=1), ref, name)
    assert_bitwise(cq.qtensor().dequantize(), ref, f"{name} qtensor")


@pytest.mark.parametrize("name", WEIGHT_FORMATS)
def test_gptq_result_is_on_the_format_and_beats_rtn_on_correlated_inputs(name):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 256, generator=g)
    x = correlated_inputs(2048, 256)
    res = gptq(w, hessian(x), name)
    assert_bitwise(res.qtensor.dequantize(), res.weight, f"{name}: QTensor == returned weight")
    assert res.qtensor.format == get_format(name)
    err_gptq = ((res.weight - w) @ x.T).square().mean()
    err_rtn = ((rtn(w, name).dequantize() - w) @ x.T).square().mean()
    assert err_gptq < 0.8 * err_rtn, f"{name}: GPTQ {err_gptq:.4g} vs RTN {err_rtn:.4g}"


@pytest.mark.parametrize("name", ["mxfp4", "int4_channel", "int4_g128", "fp8_e4m3"])
def test_gptq_with_identity_hessian_equals_rtn(name):
    """With H = I (uncorrelated inputs) the OBS update of every later column is zero: GPTQ is RTN."""
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(3))
    res = gptq(w, torch.eye(128, dtype=torch.float64), name, damp=0.0)
    assert_bitwise(res.weight, cast(w, name), name)


def test_act_order_and_dead_inputs():
    w = torch.randn(16, 96, generator=torch.Generator().manual_seed(4))
    x = correlated_inputs(1024, 96)
    x[:, 5] = 0  # a dead input feature
    res = gptq(w, hessian(x), "int4_g32", act_order=True)
    assert (res.weight[:, 5] == 0).all()
    assert_bitwise(res.qtensor.dequantize(), res.weight, "act-order")
    err = ((res.weight - w) @ x.T).square().mean()
    assert err < ((rtn(w, "int4_g32").dequantize() - w) @ x.T).square().mean()


def test_gptq_is_deterministic_and_refuses_bad_input():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(5))
    h = hessian(correlated_inputs(256, 64))
    assert torch.equal(gptq(w, h, "mxfp4").weight, gptq(w.clone(), h.clone(), "mxfp4").weight)
    with pytest.raises(ValueError, match="Hessian shape"):
        gptq(w, h[:32, :32], "mxfp4")
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        gptq(bad, h, "mxfp4")


def test_rtn_views_conv_weights_along_the_reduction_axis():
    wc = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(6))
    qt = rtn(wc, "mxfp4")
    assert qt.shape == (8, 36)
    assert_bitwise(qt.dequantize(), cast(wc.reshape(8, 36), "mxfp4"), "conv view")


def test_grouped_hessians_equal_separate_gptq_per_group():
    """A [g, in, in] Hessian solves each group of output rows with its own inputs (grouped/depthwise conv)."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(12, 48, generator=g)
    xs = [correlated_inputs(512, 48, seed=s) for s in range(3)]
    hs = torch.stack([hessian(x) for x in xs])
    grouped = gptq(w, hs, "int4_channel").weight
    for k in range(3):
        alone = gptq(w[4 * k : 4 * k + 4], hs[k], "int4_channel").weight
        assert torch.allclose(grouped[4 * k : 4 * k + 4], alone, atol=1e-6), k
    with pytest.raises(ValueError, match="does not match"):
        gptq(w, torch.stack([hessian(xs[0])] * 5), "int4_channel")


@pytest.mark.parametrize("act_order", [False, True])
def test_the_factorisation_reads_the_lower_triangle_in_either_layout_and_leaves_the_input_alone(act_order):
    """LAPACK's convention: only H's lower triangle is read (a Gram sum is symmetric only up to rounding; with
    act-order, the lower triangle of P H P), whether H comes row-major or column-major; the caller's H is
    unchanged unless ``overwrite_h``."""
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(8))
    h = hessian(correlated_inputs(512, 64))
    want = gptq(w, h, "mxfp4", act_order=act_order)
    upper = torch.triu(torch.ones(64, 64, dtype=torch.bool), 1)
    # a different, asymmetric strict upper triangle (act-order moves entries across the diagonal: H itself)
    scrambled = h if act_order else torch.where(upper, h * 1.5 + 1.0, h)
    column_major = scrambled.mT.contiguous().mT
    for given in (scrambled, column_major):
        before = given.clone()
        got = gptq(w, given, "mxfp4", act_order=act_order)
        assert_bitwise(got.weight, want.weight, "layout")
        assert got.proxy_loss == want.proxy_loss
        assert torch.equal(given, before), "the input Hessian was modified"
    single = h.float()  # a float32 Hessian: its float64 values, and left alone
    before = single.clone()
    got = gptq(w, single, "mxfp4", act_order=act_order, overwrite_h=True)
    assert_bitwise(got.weight, gptq(w, single.double(), "mxfp4", act_order=act_order).weight, "float32 H")
    assert torch.equal(single, before)


def test_overwrite_h_factors_the_callers_column_major_buffer_in_place():
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(9))
    h = hessian(correlated_inputs(512, 64))
    want = gptq(w, h, "int4_g32")
    buffer = h.mT.contiguous().mT
    got = gptq(w, buffer, "int4_g32", overwrite_h=True)
    assert_bitwise(got.weight, want.weight, "in place")
    assert not torch.equal(buffer, h)  # it now holds the factor
    assert not torch.tril(buffer, -1).any() and (torch.diagonal(buffer) > 0).all()  # H⁻¹'s upper Cholesky factor
    row_major = h.clone()  # a layout it cannot factor in place: copied, left alone
    assert_bitwise(gptq(w, row_major, "int4_g32", overwrite_h=True).weight, want.weight, "copied")
    assert torch.equal(row_major, h)
