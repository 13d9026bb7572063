"""Attention Round: on the grid, RTN when σ starts at 0, better than RTN on a correlated layer, the K-nearest
restriction equal to the full grid when it covers it, seeded sampling."""

from __future__ import annotations

import pytest
import torch

from numcast.algorithms.attention_round import attention_round, element_grid, layer_output_loss
from numcast.formats.engine import grid_cast
from numcast.formats.ops import quantize
from numcast.formats.registry import get_format

FORMATS = ["int4_channel", "int3_channel", "int2_g64", "mxfp4", "nvfp4", "mxfp6_e2m3", "int4_g128", "fp8_e4m3"]


def layer(seed=0, out=16, k=128, n=512):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, k, generator=g) * 0.1
    x = torch.randn(n, 8, generator=g) @ torch.randn(8, k, generator=g) + 0.3 * torch.randn(n, k, generator=g)
    return w, x.T @ x / n


@pytest.mark.parametrize("fmt", FORMATS)
def test_result_is_a_member_of_the_format_with_the_same_scales(fmt):
    w, h = layer(1)
    res = attention_round(w, fmt, layer_output_loss(w, h), iterations=30)
    assert torch.equal(res.qtensor.dequantize(), res.weight)
    again = grid_cast(res.weight, get_format(fmt), scales=grid_cast(w, get_format(fmt)).scales)
    assert torch.equal(again.output(w.shape, w.dtype), res.weight)  # re-quantizing with the scales: unchanged


@pytest.mark.parametrize("fmt", FORMATS)
def test_sigma_near_zero_from_the_start_is_rtn(fmt):
    w, h = layer(2)
    res = attention_round(w, fmt, layer_output_loss(w, h), iterations=20, sigma_start=1e-4, sigma_end=1e-4)
    assert torch.equal(res.weight, quantize(w, fmt).dequantize())


@pytest.mark.parametrize("fmt", ["int4_channel", "int3_channel", "int2_g64", "mxfp4", "nvfp4"])
def test_reconstruction_error_below_rtn_on_correlated_inputs(fmt):
    w, h = layer(3)
    loss = layer_output_loss(w, h)
    res = attention_round(w, fmt, loss, iterations=300)
    rtn = float(loss(quantize(w, fmt).dequantize()))
    assert float(loss(res.weight)) < 0.8 * rtn


@pytest.mark.parametrize("fmt", ["int3_channel", "mxfp4", "fp8_e4m3"])
def test_k_nearest_covering_the_grid_equals_the_full_distribution(fmt):
    w, h = layer(4, out=4, k=32)
    n = element_grid(get_format(fmt)).numel()
    full = attention_round(w, fmt, layer_output_loss(w, h), iterations=40, k_nearest=10**6)
    cover = attention_round(w, fmt, layer_output_loss(w, h), iterations=40, k_nearest=n)
    assert torch.equal(full.offsets, cover.offsets) and torch.equal(full.weight, cover.weight)
    default = attention_round(w, fmt, layer_output_loss(w, h), iterations=40)  # the whole grid up to 16 levels
    same = full if n <= 16 else attention_round(w, fmt, layer_output_loss(w, h), iterations=40, k_nearest=8)
    assert torch.equal(default.offsets, same.offsets) and torch.equal(default.weight, same.weight)
    near = attention_round(w, fmt, layer_output_loss(w, h), iterations=40, k_nearest=2)
    assert near.weight.shape == w.shape


def test_sampled_variant_is_seeded():
    w, h = layer(5, out=8, k=64)
    a = attention_round(w, "int4_channel", layer_output_loss(w, h), iterations=50, variant="sampled", seed=1)
    b = attention_round(w, "int4_channel", layer_output_loss(w, h), iterations=50, variant="sampled", seed=1)
    c = attention_round(w, "int4_channel", layer_output_loss(w, h), iterations=50, variant="sampled", seed=2)
    assert torch.equal(a.offsets, b.offsets) and not torch.equal(a.offsets, c.offsets)
    state = torch.random.get_rng_state()
    attention_round(w, "int4_channel", layer_output_loss(w, h), iterations=5, variant="sampled")
    assert torch.equal(state, torch.random.get_rng_state())


def test_time_budget_stops_early():
    w, h = layer(6)
    res = attention_round(w, "int4_channel", layer_output_loss(w, h), iterations=100_000, time_budget_s=0.2)
    assert 0 < res.iterations < 100_000


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(variant="gumbel"), "variant"),
        (dict(sigma_start=0.0), "sigma"),
        (dict(k_nearest=0), "k_nearest"),
    ],
)
def test_refusals(kw, match):
    w, h = layer(7, out=2, k=32)
    with pytest.raises(ValueError, match=match):
        attention_round(w, "int4_channel", layer_output_loss(w, h), **kw)
    with pytest.raises(ValueError, match="zero points"):
        attention_round(w, "uint4_g128_zp", layer_output_loss(w, h))
    with pytest.raises(ValueError, match="NaN"):
        attention_round(torch.full((2, 4), float("nan")), "int4_channel", lambda x: x.sum())
