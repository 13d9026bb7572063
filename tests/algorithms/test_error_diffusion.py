"""Error Diffusion as a function of tensors: Gram form == direct GPFQ loop, RTN on orthogonal inputs, lower
output error than RTN on correlated inputs, an independent per-neuron GPFQ, groups, dead features, bad input."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_bitwise

from numcast.algorithms.error_diffusion import error_diffusion, error_diffusion_direct
from numcast.algorithms.rtn import rtn

FORMATS = ["mxfp4", "mxfp6_e2m3", "nvfp4", "int4_g128", "int3_g64", "mxint8", "int4_channel", "fp8_e4m3",
           "uint4_g128_zp", "bfp4_b16", "fp8_e4m3_tensor"]  # fmt: skip
RULES = ["dynamic", "static"]


def streams(m: int, n: int, seed: int = 0, noise: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, Â): correlated float-path inputs (low-rank mix plus noise) and a perturbed quantized-path copy."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, n // 4, generator=g) @ torch.randn(n // 4, n, generator=g) + 0.3 * torch.randn(m, n, generator=g)
    return a, a + noise * torch.randn(m, n, generator=g)


def grams(a: torch.Tensor, a_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, a_hat = a.double(), a_hat.double()
    return a_hat.T @ a, a_hat.T @ a_hat


def weight(out: int, n: int, seed: int = 1) -> torch.Tensor:
    return 0.1 * torch.randn(out, n, generator=torch.Generator().manual_seed(seed))


def rel_error(a, a_hat, w, q) -> float:
    ref = a.double() @ w.double().T
    return float((a_hat.double() @ q.double().T - ref).square().sum() / ref.square().sum())


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("name", FORMATS)
def test_gram_form_equals_the_direct_gpfq_loop(name, rule):
    a, a_hat = streams(300, 200)
    w = weight(24, 200)
    g, h = grams(a, a_hat)
    gram = error_diffusion(w, g, h, name, scale_rule=rule)
    direct = error_diffusion_direct(w, a, a_hat, name, scale_rule=rule)
    assert_bitwise(gram.weight, direct.weight, name)
    assert_bitwise(gram.qtensor.dequantize(), gram.weight, f"{name}: qtensor")  # decoded from codes: on the grid


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("name", FORMATS)
def test_orthogonal_inputs_without_upstream_error_give_rtn(name, rule):
    n = 160
    a = torch.diag(torch.rand(n, generator=torch.Generator().manual_seed(3)) + 0.5)  # orthogonal features
    w = weight(16, n)
    g, h = grams(a, a)
    assert_bitwise(error_diffusion(w, g, h, name, scale_rule=rule).weight, rtn(w, name).dequantize(), name)


@pytest.mark.parametrize("name", FORMATS)
def test_lower_output_error_than_rtn_on_correlated_inputs(name):
    w = weight(32, 256)
    q_rtn = rtn(w, name).dequantize()
    # without error from upstream ED at least halves RTN's error; with it (which no weight fully undoes) it
    # stays below RTN's
    for noise, factor in ((0.0, 0.5), (0.2, 1.0)):
        a, a_hat = streams(512, 256, noise=noise)
        q = error_diffusion(w, *grams(a, a_hat), name).weight
        assert rel_error(a, a_hat, w, q) < factor * rel_error(a, a_hat, w, q_rtn), (name, noise)


def gpfq_per_neuron(w: torch.Tensor, a: torch.Tensor, a_hat: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Lybrand & Saab's GPFQ written out per neuron and per feature, with a per-channel integer grid of step
    amax/qmax (the float weights' scale), round half to even."""
    w, a, a_hat = w.double(), a.double(), a_hat.double()
    out = torch.zeros_like(w)
    for i in range(w.shape[0]):
        s = w[i].abs().max().float().double() / qmax
        u = torch.zeros(a.shape[0], dtype=torch.float64)
        for t in range(w.shape[1]):
            p = torch.dot(a_hat[:, t], u + w[i, t] * a[:, t]) / torch.dot(a_hat[:, t], a_hat[:, t])
            q = torch.clamp(torch.round(p / s), qmin, qmax) * s
            out[i, t] = q
            u += w[i, t] * a[:, t] - q * a_hat[:, t]
    return out.float()


def test_integer_per_channel_equals_an_independent_gpfq():
    a, a_hat = streams(200, 48, seed=4)
    w = weight(6, 48, seed=5)
    ref = gpfq_per_neuron(w, a, a_hat, -8, 7)
    got = error_diffusion(w, *grams(a, a_hat), "int4_channel").weight
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    assert (got != rtn(w, "int4_channel").dequantize()).any()  # GPFQ moved weights off their nearest level


@pytest.mark.parametrize("name", ["int4_channel", "mxfp4", "int3_g64"])
def test_groups_are_independent_layers(name):
    """A grouped layer (rows split into 4 groups, each with its own inputs) == the 4 layers one by one."""
    w = weight(32, 64)
    stats = [grams(*streams(128, 64, seed=10 + k)) for k in range(4)]
    g, h = torch.stack([s[0] for s in stats]), torch.stack([s[1] for s in stats])
    whole = error_diffusion(w, g, h, name).weight
    parts = torch.cat([error_diffusion(w[8 * k : 8 * k + 8], *stats[k], name).weight for k in range(4)])
    assert_bitwise(whole, parts, name)


@pytest.mark.parametrize("name", ["int4_channel", "mxfp4"])
def test_dead_features_keep_their_rounded_weight(name):
    a, a_hat = streams(256, 64)
    a_hat[:, [3, 40]] = 0.0  # dead in the quantized path
    w = weight(8, 64)
    q = error_diffusion(w, *grams(a, a_hat), name, scale_rule="static").weight
    assert torch.isfinite(q).all()
    assert_bitwise(q[:, [3, 40]], rtn(w, name).dequantize()[:, [3, 40]], name)
    assert_bitwise(error_diffusion_direct(w, a, a_hat, name, scale_rule="static").weight, q, f"{name}: direct")


def test_bad_input_is_refused():
    a, a_hat = streams(64, 32)
    g, h = grams(a, a_hat)
    w = weight(4, 32)
    with pytest.raises(ValueError, match="do not match"):
        error_diffusion(w[:, :16], g, h, "mxfp4")
    h[0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        error_diffusion(w, g, h, "mxfp4")
    with pytest.raises(ValueError, match="unknown scale rule"):
        error_diffusion(w, *grams(a, a_hat), "mxfp4", scale_rule="later")


def test_identity_q_refits_float_weights():
    """Q = identity (layer calibration): unchanged without upstream error, lower output error with it."""
    w = weight(16, 64)
    a, a_hat = streams(256, 64, noise=0.2)
    same = error_diffusion(w, *grams(a, a), None)
    assert same.qtensor is None
    assert_bitwise(same.weight, w, "no upstream error: the weight itself")
    refit = error_diffusion(w, *grams(a, a_hat), None).weight
    best = torch.linalg.lstsq(a_hat.double(), a.double() @ w.double().T).solution.T  # the least-squares optimum
    assert rel_error(a, a_hat, w, best) <= rel_error(a, a_hat, w, refit) < rel_error(a, a_hat, w, w)
