"""EP-init and the A2Q/A2Q+ map: projection exact against a brute-force QP, the budget always met."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from numcast.accumulator.bounds import min_accumulator_bits
from numcast.algorithms.ep_init import (
    a2q_integer_weights,
    constrain_codes,
    ep_init,
    initial_scale,
    l1_budget,
    project_l1_ball,
)


def _rand(seed, *shape, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def qp_projection(v: np.ndarray, z: float) -> np.ndarray:
    """min ½‖u − v‖² s.t. ‖u‖₁ ≤ z as a smooth QP over u = p − n, p, n ≥ 0 (SLSQP)."""
    k = v.size
    x0 = np.concatenate([np.clip(v, 0, None), np.clip(-v, 0, None)]) * 0.5
    fun = lambda x: 0.5 * np.sum((x[:k] - x[k:] - v) ** 2)  # noqa: E731
    jac = lambda x: np.concatenate([x[:k] - x[k:] - v, -(x[:k] - x[k:] - v)])  # noqa: E731
    cons = [{"type": "ineq", "fun": lambda x: z - x.sum(), "jac": lambda x: -np.ones(2 * k)}]
    res = minimize(fun, x0, jac=jac, bounds=[(0, None)] * (2 * k), constraints=cons, method="SLSQP",
                   options={"ftol": 1e-14, "maxiter": 500})  # fmt: skip
    return res.x[:k] - res.x[k:]


@pytest.mark.parametrize("seed", range(6))
def test_projection_equals_a_brute_force_qp(seed):
    v = _rand(seed, 5, 7)
    radius = torch.tensor([0.5, 1.0, 2.5, 100.0, 0.0], dtype=torch.float64)
    p = project_l1_ball(v, radius)
    for i in range(5):
        want = qp_projection(v[i].numpy(), float(radius[i]))
        np.testing.assert_allclose(p[i].numpy(), want, atol=2e-6)
    assert torch.equal(p[3], v[3])  # inside the ball: unchanged
    assert bool((p[4] == 0).all())
    assert bool((p.abs().sum(1) <= radius + 1e-9).all())


def test_projection_keeps_ties_and_signs():
    v = torch.tensor([[3.0, -3.0, 1.0, 0.0]])
    p = project_l1_ball(v, 4.0)  # θ = 1: [2, -2, 0, 0]
    assert p.tolist() == [[2.0, -2.0, 0.0, 0.0]]


@pytest.mark.parametrize("rule", ["a2q", "a2q+"])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("P", [10, 12, 14, 16])
def test_a2q_map_meets_the_budget_and_the_simulated_bound(rule, signed, P):
    w = _rand(P, 64, 288, scale=0.05)
    w[0] = 0  # a dead channel
    w[1] += 0.3  # a channel far from zero-mean
    M, N = 4, 4
    T = l1_budget(rule, P, N, signed)
    init = ep_init(w, M, T)
    g = torch.where(init.g > 0, init.g, torch.ones_like(init.g))
    q = a2q_integer_weights(init.v, g, init.s, T, M, rule == "a2q+")
    assert bool((q == q.round()).all()) and float(q.abs().max()) <= 7
    assert bool((q[0] == 0).all())
    need = min_accumulator_bits(q.long(), N, signed, "exact")
    assert int(need.max()) <= P
    closed = min_accumulator_bits(q.long(), N, signed, rule)
    assert int(closed.max()) <= P


def test_a2q_plus_is_looser_than_a2q_for_unsigned_inputs():
    w = _rand(0, 32, 512, scale=0.05)
    kept = {}
    for rule in ("a2q", "a2q+"):
        T = l1_budget(rule, 14, 4, False)
        init = ep_init(w, 4, T)
        q = a2q_integer_weights(init.v, init.g, init.s, T, 4, rule == "a2q+")
        kept[rule] = float((q * init.s[:, None] - w).square().sum())
    assert kept["a2q+"] < kept["a2q"]  # twice the budget: closer to the float weights


def test_round_to_nearest_breaks_the_guarantee():
    """The same map with round-to-nearest instead of toward zero overflows the budget on a constructed row:
    16 weights of 0.6 units each have ‖·‖₁ = 9.6 ≤ T = 10, but round to 1 each (‖q‖₁ = 16)."""
    T = 10.0
    v = torch.full((1, 16), 0.6, dtype=torch.float64)
    g, s = torch.tensor([9.6]), torch.tensor([1.0])
    q_rtz = a2q_integer_weights(v, g, s, T, 4, False)
    assert float(q_rtz.abs().sum()) <= T
    q_rtn = torch.round(v * (9.6 / v.abs().sum()))
    assert float(q_rtn.abs().sum()) > T


def test_constrain_codes_leaves_rows_within_budget_alone_and_fixes_the_rest():
    gen = torch.Generator().manual_seed(3)
    q = torch.randint(-7, 8, (40, 64), generator=gen).double()
    q[:20] = torch.randint(-2, 3, (20, 64), generator=gen).double()  # rows within the budget
    T = l1_budget("a2q", 12, 4, False)  # 127.9375
    out = constrain_codes(q, 4, T, zero_center=False)
    inside = q.abs().sum(1) <= T
    assert bool(inside.any()) and bool((~inside).any())
    assert torch.equal(out[inside], q[inside])
    assert bool((out.abs().sum(1) <= T).all())
    plus = constrain_codes(q, 4, l1_budget("a2q+", 12, 4, False), zero_center=True)
    half = torch.maximum(plus.clamp(min=0).sum(1), (-plus).clamp(min=0).sum(1))
    assert bool((half <= l1_budget("a2q+", 12, 4, False) / 2).all())


def test_initial_scale_is_absmax_over_qmax():
    w = torch.tensor([[0.7, -1.4], [0.0, 0.0]])
    assert initial_scale(w, 4).tolist() == [pytest.approx(0.2), 1.0]


@pytest.mark.parametrize(
    "call",
    [
        lambda: project_l1_ball(torch.ones(3), 1.0),
        lambda: project_l1_ball(torch.ones(2, 3), -1.0),
        lambda: project_l1_ball(torch.tensor([[float("nan"), 1.0]]), 1.0),
        lambda: l1_budget("a2q++", 16, 4, False),
        lambda: constrain_codes(torch.full((1, 3), 0.5), 4, 10.0, False),
        lambda: ep_init(torch.tensor([[float("inf")]]), 4, 10.0),
    ],
)
def test_bad_input_is_refused(call):
    with pytest.raises(ValueError):
        call()
