"""EP-init and the A2Q/A2Q+ map: projection exact against a brute-force QP, the budget always met."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from numcast.accumulator.bounds import min_accumulator_bits
from numcast.algorithms.ep_init import (
    a2q_integer_weights,
    ep_init,
    fit_budget,
    initial_scale,
    l1_budget,
    project_budget,
    project_l1_ball,
    round_within_budget,
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


@pytest.mark.parametrize("rounding", ["budget", "toward_zero"])
@pytest.mark.parametrize("rule", ["a2q", "a2q+"])
def test_fit_budget_leaves_codes_within_budget_alone_and_fixes_the_rest(rule, rounding):
    gen = torch.Generator().manual_seed(3)
    q = torch.randint(-7, 8, (40, 64), generator=gen).double()
    q[:20] = torch.randint(-2, 3, (20, 64), generator=gen).double()  # rows within the budget
    T = l1_budget(rule, 12, 4, False)
    out = fit_budget(q, 4, T, rule, rounding)
    half = torch.maximum(q.clamp(min=0).sum(1), (-q).clamp(min=0).sum(1))
    inside = q.abs().sum(1) <= T if rule == "a2q" else half <= T / 2
    assert bool(inside.any()) and bool((~inside).any())
    assert torch.equal(out[inside], q[inside])
    assert int(min_accumulator_bits(out.long(), 4, False, rule).max()) <= 12
    assert int(min_accumulator_bits(out.long(), 4, False, "exact").max()) <= 12


def brute_force_best_rounding(y: list[float], budget: float) -> float:
    """The least squared error over integer vectors within the L1 budget, each entry trunc or away from zero."""
    import itertools
    import math

    best = math.inf
    for ups in itertools.product((0, 1), repeat=len(y)):
        q = [math.trunc(v) + (math.copysign(1, v) if u else 0) for v, u in zip(y, ups, strict=True)]
        if sum(abs(x) for x in q) <= budget:
            best = min(best, sum((a - b) ** 2 for a, b in zip(q, y, strict=True)))
    return best


@pytest.mark.parametrize("seed", range(8))
def test_budget_rounding_is_optimal_among_trunc_or_away_choices(seed):
    """Rounding up (away from zero) the largest fractional parts ≥ 0.5 first is the best use of the budget."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(1, 9, generator=g, dtype=torch.float64) * 3
    budget = float(y.abs().sum()) * 0.9
    v = project_budget(y, budget, split=False)
    q = round_within_budget(v, budget, 8, split=False)
    assert float(q.abs().sum()) <= budget
    err = float((q - v).square().sum())
    assert err == pytest.approx(brute_force_best_rounding(v[0].tolist(), budget), abs=1e-9)
    assert float((torch.trunc(v) - v).square().sum()) >= err  # never worse than toward zero


def test_budget_rounding_is_round_to_nearest_when_that_fits():
    y = torch.tensor([[0.6, -1.7, 2.2, 0.4]], dtype=torch.float64)
    assert round_within_budget(y, 100.0, 4, split=False).tolist() == [[1.0, -2.0, 2.0, 0.0]]
    assert round_within_budget(y, 4.0, 4, split=False).tolist() == [[0.0, -2.0, 2.0, 0.0]]  # 0.7 beats 0.6


def test_split_projection_bounds_each_half():
    y = torch.tensor([[3.0, 1.0, -0.5, -0.25]], dtype=torch.float64)
    p = project_budget(y, 4.0, split=True)  # positives to L1 2 (θ = 1), negatives inside
    assert p.tolist() == [[2.0, 0.0, -0.5, -0.25]]


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
        lambda: fit_budget(torch.ones(1, 3), 4, 10.0, "a2q", "nearest"),
        lambda: fit_budget(torch.tensor([[float("nan")]]), 4, 10.0, "a2q"),
        lambda: ep_init(torch.tensor([[float("inf")]]), 4, 10.0),
    ],
)
def test_bad_input_is_refused(call):
    with pytest.raises(ValueError):
        call()
