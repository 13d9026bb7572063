"""Lossy coding length against its direct formula and its theory; the allocator against the budget."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from numcast.algorithms.mixed_precision import (
    FeatureGram,
    LayerChoice,
    allocate,
    coding_length,
    coding_length_spectrum,
)


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


@pytest.mark.parametrize("n,d", [(50, 6), (4, 9), (30, 30)])
def test_feature_gram_added_in_batches_gives_the_coding_length_of_all_rows(n, d):
    z = _z(n + d, n, d) + 3.0  # an offset: the running mean must be removed
    gram = FeatureGram()
    for part in torch.split(z, 7):
        gram.add(part)
    for eps in (0.2, 1.0, 5.0):
        assert gram.coding_length(eps) == pytest.approx(coding_length(z, eps), rel=1e-9)
    assert gram.n == n


def test_coding_length_spectrum_is_the_determinant_diagonalised():
    z = _z(9, 20, 5)
    x = z.double() - z.double().mean(0)
    lam = torch.linalg.eigvalsh(x.T @ x)
    assert coding_length_spectrum(lam, 20, 5, 0.7) == pytest.approx(direct(z, 0.7), rel=1e-9)
    with pytest.raises(ValueError, match="no feature vectors"):
        FeatureGram().spectrum()


def _layers(seed, n=12, k=4):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        params = int(torch.randint(100, 5000, (1,), generator=g))
        weight = float(torch.rand(1, generator=g))  # e.g. coding length per parameter
        bits = (2.25, 3.25, 4.125, 8.0)[:k]
        out.append(LayerChoice(f"l{i}", tuple(params * b for b in bits), tuple(weight * 4.0**-b for b in bits)))
    return out


def _used(layers, choice):
    return sum(lay.costs[choice[lay.name]] for lay in layers)


@pytest.mark.parametrize("seed", range(5))
def test_allocation_never_exceeds_the_budget_and_leaves_less_than_any_next_step(seed):
    layers = _layers(seed)
    cheapest = sum(lay.costs[0] for lay in layers)
    top = sum(lay.costs[-1] for lay in layers)
    for frac in (0.0, 0.1, 0.37, 0.8, 1.0):
        budget = cheapest + frac * (top - cheapest)
        choice = allocate(layers, budget)
        used = _used(layers, choice)
        assert used <= budget
        steps = [lay.costs[choice[lay.name] + 1] - lay.costs[choice[lay.name]]
                 for lay in layers if choice[lay.name] + 1 < len(lay.costs)]  # fmt: skip
        assert not steps or budget - used < min(steps)


@pytest.mark.parametrize("seed", range(4))
def test_allocation_is_the_least_distortion_of_all_assignments_within_budget(seed):
    layers = _layers(seed, n=6, k=3)
    cheapest = sum(lay.costs[0] for lay in layers)
    top = sum(lay.costs[-1] for lay in layers)
    for frac in (0.15, 0.5, 0.85):
        budget = cheapest + frac * (top - cheapest)
        best = min(
            sum(lay.distortions[i] for lay, i in zip(layers, pick, strict=True))
            for pick in itertools.product(range(3), repeat=len(layers))
            if sum(lay.costs[i] for lay, i in zip(layers, pick, strict=True)) <= budget
        )
        choice = allocate(layers, budget)
        got = sum(lay.distortions[choice[lay.name]] for lay in layers)
        assert got == pytest.approx(best, rel=1e-9) and _used(layers, choice) <= budget


def test_larger_weight_never_gets_fewer_bits_when_layers_are_otherwise_equal():
    weights = [0.1, 0.9, 0.5, 0.7, 0.3]
    bits = (2.0, 3.0, 4.0, 8.0)
    layers = [LayerChoice(f"l{i}", bits, tuple(w * 4.0**-b for b in bits)) for i, w in enumerate(weights)]
    for budget in (5 * 2.0 + 3.0, 5 * 2.0 + 9.0, 5 * 3.0 + 4.0):
        choice = allocate(layers, budget)
        ranked = sorted(layers, key=lambda lay: -weights[int(lay.name[1:])])
        idx = [choice[lay.name] for lay in ranked]
        assert idx == sorted(idx, reverse=True) and _used(layers, choice) <= budget


def test_a_step_up_that_raises_distortion_is_not_taken_to_fill_the_budget():
    layers = [LayerChoice("a", (1.0, 2.0), (0.5, 0.7)), LayerChoice("b", (1.0, 2.0), (0.5, 0.1))]
    assert allocate(layers, 10.0) == {"a": 0, "b": 1}


def test_refusals():
    with pytest.raises(ValueError, match="below the cheapest"):
        allocate([LayerChoice("a", (10.0, 20.0), (1.0, 0.5))], 5.0)
    with pytest.raises(ValueError, match="strictly increasing"):
        allocate([LayerChoice("a", (10.0, 10.0), (1.0, 0.5))], 50.0)
    with pytest.raises(ValueError, match="non-negative distortion"):
        allocate([LayerChoice("a", (10.0, 20.0), (1.0, float("nan")))], 50.0)
    with pytest.raises(ValueError, match="non-negative distortion"):
        allocate([LayerChoice("a", (10.0, 20.0), (1.0,))], 50.0)
    with pytest.raises(ValueError, match="eps"):
        coding_length(torch.ones(2, 2), 0.0)
    with pytest.raises(ValueError, match="NaN"):
        coding_length(torch.tensor([[float("nan"), 1.0]]), 1.0)
