"""Lossy coding length against its direct formula and its theory; the allocator against the budget."""

from __future__ import annotations

import math

import pytest
import torch

from numcast.algorithms.mixed_precision import LayerChoice, allocate, coding_length, layer_coding_length


def direct(z: torch.Tensor, eps: float) -> float:
    """(n + D)/2 · log2 det(I_D + D/(ε² n) · Z̄ᵀZ̄), Z̄ = Z with its row mean removed, as written."""
    x = z.double() - z.double().mean(0, keepdim=True)
    n, d = x.shape
    return float((n + d) / 2 * torch.logdet(torch.eye(d, dtype=torch.float64) + d / (eps**2 * n) * x.T @ x)) / math.log(
        2
    )


def _z(seed, n, d, rank=None):
    g = torch.Generator().manual_seed(seed)
    if rank is None:
        return torch.randn(n, d, generator=g)
    return torch.randn(n, rank, generator=g) @ torch.randn(rank, d, generator=g)


@pytest.mark.parametrize("n,d", [(5, 12), (12, 5), (7, 7), (1, 4)])
def test_matches_the_direct_formula_on_either_gram(n, d):
    z = _z(n * d, n, d)
    for eps in (0.1, 1.0, 3.0):
        assert coding_length(z, eps) == pytest.approx(direct(z, eps), rel=1e-9, abs=1e-9)


def test_grows_with_rank_and_with_one_over_eps():
    by_rank = [coding_length(_z(1, 40, 16, rank=r), 0.5) for r in (1, 2, 4, 8, 16)]
    assert all(a < b for a, b in zip(by_rank, by_rank[1:], strict=False))
    z = _z(2, 30, 10)
    by_eps = [coding_length(z, e) for e in (2.0, 1.0, 0.5, 0.25)]
    assert all(a < b for a, b in zip(by_eps, by_eps[1:], strict=False))
    # high-resolution limit: halving ε adds log2(4) = 2 bits per eigenvalue, (n + D)/2 · 2 · rank in all
    assert by_eps[-1] - by_eps[-2] == pytest.approx((30 + 10) / 2 * 10 * 2, rel=0.05)


def test_mean_is_removed_and_row_order_does_not_matter():
    z = _z(3, 20, 6)
    assert coding_length(z + 5.0, 0.5) == pytest.approx(coding_length(z, 0.5), rel=1e-7)  # float32 input
    assert coding_length(z[torch.randperm(20, generator=torch.Generator().manual_seed(0))], 0.5) == pytest.approx(
        coding_length(z, 0.5), rel=1e-9
    )


def test_layer_coding_length_is_scale_free_and_zero_for_zero_weights():
    w = _z(4, 16, 32)
    assert layer_coding_length(w) == pytest.approx(layer_coding_length(7.0 * w), rel=1e-9)
    assert layer_coding_length(torch.zeros(4, 8)) == 0.0
    assert layer_coding_length(_z(5, 16, 32, rank=1)) < layer_coding_length(w)


def _layers(seed, n=12):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        params = int(torch.randint(100, 5000, (1,), generator=g))
        out.append(
            LayerChoice(f"l{i}", tuple(params * b for b in (2.25, 3.25, 4.125, 8.0)), float(torch.rand(1, generator=g)))
        )
    return out


@pytest.mark.parametrize("seed", range(5))
def test_allocation_never_exceeds_the_budget_and_leaves_less_than_any_next_step(seed):
    layers = _layers(seed)
    cheapest = sum(lay.costs[0] for lay in layers)
    top = sum(lay.costs[-1] for lay in layers)
    for frac in (0.0, 0.1, 0.37, 0.8, 1.0):
        budget = cheapest + frac * (top - cheapest)
        choice = allocate(layers, budget)
        used = sum(lay.costs[choice[lay.name]] for lay in layers)
        assert used <= budget + 1e-6
        steps = [lay.costs[choice[lay.name] + 1] - lay.costs[choice[lay.name]]
                 for lay in layers if choice[lay.name] + 1 < len(lay.costs)]  # fmt: skip
        assert not steps or budget - used < min(steps)


def test_higher_priority_never_gets_fewer_bits_when_costs_are_equal():
    layers = [LayerChoice(f"l{i}", (2.0, 3.0, 4.0, 8.0), p) for i, p in enumerate([0.1, 0.9, 0.5, 0.7, 0.3])]
    choice = allocate(layers, 5 * 2.0 + 9.0)
    ranked = sorted(layers, key=lambda lay: -lay.priority)
    idx = [choice[lay.name] for lay in ranked]
    assert idx == sorted(idx, reverse=True) and sum(layers[0].costs[i] for i in idx) <= 19.0


def test_refusals():
    with pytest.raises(ValueError, match="below the cheapest"):
        allocate([LayerChoice("a", (10.0, 20.0), 1.0)], 5.0)
    with pytest.raises(ValueError, match="strictly increasing"):
        allocate([LayerChoice("a", (10.0, 10.0), 1.0)], 50.0)
    with pytest.raises(ValueError, match="eps"):
        coding_length(torch.ones(2, 2), 0.0)
    with pytest.raises(ValueError, match="NaN"):
        coding_length(torch.tensor([[float("nan"), 1.0]]), 1.0)
