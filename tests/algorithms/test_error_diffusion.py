"""Error Diffusion as a function of tensors: Gram form == direct GPFQ loop, RTN on orthogonal inputs, lower
output error than RTN on correlated inputs, an independent per-neuron GPFQ, groups, dead features, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_bitwise

from numcast.algorithms.error_diffusion import (
    error_diffusion,
    error_diffusion_direct,
    permute_in_place,
    visiting_order,
)
from numcast.algorithms.rtn import rtn

FORMATS = ["mxfp4", "mxfp6_e2m3", "nvfp4", "int4_g128", "int3_g64", "mxint8", "int4_channel", "fp8_e4m3",
           "uint4_g128_zp", "bfp4_b16", "fp8_e4m3_tensor"]  # fmt: skip
RULES = ["dynamic", "static"]
ORDERS = ["strong-first", "weak-first", "natural", "auto"]


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
    for order in ORDERS if name in ("mxfp4", "int4_channel") else ["strong-first"]:
        gram = error_diffusion(w, g, h, name, scale_rule=rule, order=order)
        direct = error_diffusion_direct(w, a, a_hat, name, scale_rule=rule, order=order)
        assert gram.order == direct.order
        assert_bitwise(gram.weight, direct.weight, f"{name} {order}")
    assert_bitwise(gram.qtensor.dequantize(), gram.weight, f"{name}: qtensor")  # decoded from codes: on the grid


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("name", FORMATS)
def test_orthogonal_inputs_without_upstream_error_give_rtn(name, rule):
    n = 160
    a = torch.diag(torch.rand(n, generator=torch.Generator().manual_seed(3)) + 0.5)  # orthogonal features
    w = weight(16, n)
    g, h = grams(a, a)
    for order in ORDERS:
        got = error_diffusion(w, g, h, name, scale_rule=rule, order=order).weight
        assert_bitwise(got, rtn(w, name).dequantize(), f"{name} {order}")


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


@pytest.mark.parametrize("order", ["natural", "strong-first"])
def test_integer_per_channel_equals_an_independent_gpfq(order):
    """GPFQ as published (natural order) and on columns permuted by decreasing ||Â_t||², by hand."""
    a, a_hat = streams(200, 48, seed=4)
    a = a * torch.linspace(0.2, 3.0, 48)  # features of different strength
    a_hat = a_hat * torch.linspace(0.2, 3.0, 48)
    w = weight(6, 48, seed=5)
    perm = torch.arange(48) if order == "natural" else torch.argsort(a_hat.double().square().sum(0), descending=True)
    ref = gpfq_per_neuron(w[:, perm], a[:, perm], a_hat[:, perm], -8, 7)[:, torch.argsort(perm)]
    got = error_diffusion(w, *grams(a, a_hat), "int4_channel", order=order).weight
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    assert (got != rtn(w, "int4_channel").dequantize()).any()  # GPFQ moved weights off their nearest level


def test_visiting_orders():
    h = torch.diag(torch.tensor([1.0, 5.0, 3.0, 0.0, 4.0, 2.0, 6.0, 0.5]))
    assert visiting_order(h, "strong-first").tolist() == [6, 1, 4, 2, 5, 0, 7, 3]
    assert visiting_order(h, "weak-first").tolist() == [3, 7, 0, 5, 2, 4, 1, 6]
    assert visiting_order(h, "natural").tolist() == list(range(8))
    # blocks of 4 kept whole (the dynamic scale rule): block 1 (sum 12.5) before block 0 (sum 9)
    assert visiting_order(h, "strong-first", whole_blocks=4).tolist() == [6, 4, 5, 7, 1, 2, 0, 3]
    with pytest.raises(ValueError, match="unknown column order"):
        visiting_order(h, "random")


def test_auto_keeps_the_order_with_the_lower_objective():
    a, a_hat = streams(256, 64, noise=0.1)
    a, a_hat = a * torch.logspace(-1, 1, 64), a_hat * torch.logspace(-1, 1, 64)
    w = weight(16, 64)
    g, h = grams(a, a_hat)
    errs = {o: rel_error(a, a_hat, w, error_diffusion(w, g, h, "mxfp4", order=o).weight)
            for o in ("strong-first", "weak-first")}  # fmt: skip
    auto = error_diffusion(w, g, h, "mxfp4", order="auto")
    assert auto.order == min(errs, key=errs.get)
    assert rel_error(a, a_hat, w, auto.weight) == min(errs.values())


@pytest.mark.parametrize("name", ["int4_channel", "mxfp4", "int3_g64"])
def test_groups_are_independent_layers(name):
    """A grouped layer (rows split into 4 groups, each with its own inputs) == the 4 layers one by one, when
    they visit their columns in the same order (groups share one order, from their summed norms)."""
    w = weight(32, 64)
    stats = [grams(*streams(128, 64, seed=10 + k)) for k in range(4)]
    g, h = torch.stack([s[0] for s in stats]), torch.stack([s[1] for s in stats])
    for order in ("natural", "strong-first"):
        perm = visiting_order(h, order)
        whole = error_diffusion(w, g, h, name, order=order).weight
        parts = []
        for k in range(4):  # each part with the group order imposed: permute, natural order, unpermute
            gk, hk = (m[perm][:, perm] for m in stats[k])
            pk = error_diffusion(w[8 * k : 8 * k + 8, perm], gk, hk, name, order="natural").weight
            parts.append(pk[:, torch.argsort(perm)])
        if name != "int4_channel" and order != "natural":
            continue  # block formats: permuting columns moves them across blocks; only natural order compares
        assert_bitwise(whole, torch.cat(parts), f"{name} {order}")


@pytest.mark.parametrize("name", ["int4_channel", "mxfp4"])
def test_dead_features_keep_their_rounded_weight(name):
    a, a_hat = streams(256, 64)
    a_hat[:, [3, 40]] = 0.0  # dead in the quantized path
    w = weight(8, 64)
    q = error_diffusion(w, *grams(a, a_hat), name).weight
    assert torch.isfinite(q).all()
    assert_bitwise(q[:, [3, 40]], rtn(w, name).dequantize()[:, [3, 40]], name)
    assert_bitwise(error_diffusion_direct(w, a, a_hat, name).weight, q, f"{name}: direct")


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
    with pytest.raises(ValueError, match="unknown column order"):
        error_diffusion(w, *grams(a, a_hat), "mxfp4", order="random")


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


@pytest.mark.parametrize("order", ORDERS)
def test_overwrite_gram_gives_the_same_bits(order):
    """``overwrite_gram`` permutes the caller's matrices in place and then releases their memory (one order), or
    leaves them alone (``auto``); the result is the same either way."""
    w = weight(24, 64)
    a, a_hat = streams(256, 64, noise=0.2)
    g, h = grams(a, a_hat)
    want = error_diffusion(w, g, h, "mxfp4", order=order)
    g2, h2 = g.clone(), h.clone()
    got = error_diffusion(w, g2, h2, "mxfp4", order=order, overwrite_gram=True)
    assert_bitwise(got.weight, want.weight, order)
    assert got.order == want.order
    if order == "auto":
        assert torch.equal(g2, g) and torch.equal(h2, h)
    else:  # used in their own memory, then released: reading them raises instead of giving permuted values
        assert g2.untyped_storage().nbytes() == 0 and h2.untyped_storage().nbytes() == 0


@pytest.mark.parametrize(("groups", "n", "rows_per_step"), [(1, 67, 16), (3, 9, 256), (1, 300, 256), (2, 40, 7)])
def test_permute_in_place_equals_the_gather(groups, n, rows_per_step):
    """The in-place permutation gives the gather's matrix bit for bit, in the same memory, for random
    permutations (several cycles), the identity and a single long cycle; slabs that do not divide n included."""
    gen = torch.Generator().manual_seed(n)
    m = torch.randn(groups, n, n, generator=gen, dtype=torch.float64)
    cycle = torch.roll(torch.arange(n), 1)
    for perm in (torch.randperm(n, generator=gen), torch.arange(n), cycle):
        work = m.clone()
        ptr = work.data_ptr()
        out = permute_in_place(work, perm, rows_per_step)
        assert out.data_ptr() == ptr
        assert torch.equal(out, m[:, perm[:, None], perm])


@pytest.mark.parametrize("order", ["strong-first", "auto"])
@pytest.mark.parametrize("name", ["mxfp4", "int4_g128", "nvfp4", "int4_channel"])
def test_damping_is_gpfq_with_a_row_per_feature_tying_it_to_its_float_weight(name, order):
    """``damp`` = the direct GPFQ loop on the calibration rows plus one row √λ·e_t per input feature in both
    streams (λ = damp · mean ||Â_t||²): the objective ||ÂŴᵀ − AWᵀ||² + λ||Ŵ − W||²."""
    a, a_hat = streams(300, 200, noise=0.2)
    w = weight(24, 200)
    g, h = grams(a, a_hat)
    g0, h0 = g.clone(), h.clone()
    damp = 0.5
    extra = math.sqrt(damp * float(torch.diagonal(h).mean())) * torch.eye(200, dtype=torch.float64)
    got = error_diffusion(w, g, h, name, order=order, damp=damp)
    want = error_diffusion_direct(w, torch.cat([a.double(), extra]), torch.cat([a_hat.double(), extra]), name,
                                  order=order)  # fmt: skip
    assert got.order == want.order
    assert_bitwise(got.weight, want.weight, f"{name} {order}")
    assert not torch.equal(got.weight, error_diffusion(w, g, h, name, order=order).weight), "damping did nothing"
    assert torch.equal(g, g0) and torch.equal(h, h0), "the caller's matrices were changed"


@pytest.mark.parametrize("name", ["mxfp4", "int4_g128", "nvfp4"])
def test_overwhelming_damping_gives_rtn_and_bad_damping_is_refused(name):
    a, a_hat = streams(300, 128, noise=0.2)
    w = weight(16, 128)
    g, h = grams(a, a_hat)
    assert_bitwise(error_diffusion(w, g, h, name, damp=1e9).weight, rtn(w, name).dequantize(), name)
    for bad in (-0.01, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="damp"):
            error_diffusion(w, g, h, name, damp=bad)
