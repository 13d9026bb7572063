"""cast / quantize / cast_ste behaviour: bad input, STE gradients, statistics, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from numcast.formats.ops import cast, cast_stats, cast_ste, quantize


def test_integer_tensors_are_refused_with_type_error():
    with pytest.raises(TypeError, match="floating"):
        cast(torch.arange(4), "int8")
    with pytest.raises(TypeError):
        cast([1.0, 2.0], "int8")


def test_stochastic_needs_explicit_randomness_and_leaves_global_rng_alone():
    with pytest.raises(ValueError, match="Generator or seed"):
        cast(torch.rand(8), "int4", rounding="stochastic")
    x = torch.rand(64)
    state = torch.get_rng_state()
    cast(x, "int4_g128", rounding="stochastic", seed=1)
    cast(x, "mxfp4", rounding="stochastic", generator=torch.Generator().manual_seed(2))
    assert torch.equal(state, torch.get_rng_state())


def test_same_inputs_same_bits():
    x = torch.randn(64, 256)
    for name in ("mxfp4", "nvfp4", "int4_g128"):
        assert torch.equal(cast(x, name), cast(x.clone(), name))


def test_out_argument():
    x = torch.randn(8, 64)
    y = torch.empty_like(x)
    assert cast(x, "mxfp4", out=y) is y and torch.equal(y, cast(x, "mxfp4"))
    with pytest.raises(ValueError, match="out must match"):
        cast(x, "mxfp4", out=torch.empty(8, 32))
    for bad in (torch.empty(8, 32), torch.empty(8, 64, dtype=torch.float64)):  # quantize(out=) checks the same
        with pytest.raises(ValueError, match="out must match"):
            quantize(x, "mxfp4", out=bad)


def test_ste_passes_gradient_and_masks_saturated_values():
    x = torch.tensor([0.3, 1.0, 100.0, -100.0], requires_grad=True)
    y = cast_ste(x, "fp4_e2m1")
    assert torch.equal(y.detach(), cast(x.detach(), "fp4_e2m1"))
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 1.0]
    x.grad = None
    cast_ste(x, "fp4_e2m1", mask_outside=True).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0]


def test_stats_count_saturation_flush_and_non_finite():
    x = torch.tensor([0.1, 1.0, 10.0, float("nan"), float("inf"), 2.0])
    _, s = cast_stats(x, "fp4_e2m1")
    assert s["nan_in"] == 1 and s["inf_in"] == 1
    assert s["nan_out"] == 2 and s["inf_out"] == 0  # inf has no FP4 encoding: NaN, counted
    assert s["frac_saturated"] == pytest.approx(1 / 6)  # 10 -> 6
    assert s["frac_flushed_to_zero"] == pytest.approx(1 / 6)  # 0.1 -> 0
    exact = (1.0 - 1.0) ** 2 + (6.0 - 10.0) ** 2 + 0.1**2
    assert s["mse"] == pytest.approx(exact / 4)
    assert math.isfinite(s["sqnr_db"])


def test_empty_and_scalar_tensors():
    assert cast(torch.empty(0, 32), "mxfp4").shape == (0, 32)
    assert cast(torch.tensor(3.3), "fp4_e2m1").item() == 3.0
    assert cast(torch.tensor(3.3), "mxfp4").shape == ()
