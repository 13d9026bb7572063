"""Closed-form accumulator bounds against a brute force over every input, and the published P formulas."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from numcast.accumulator.bounds import (
    a2q_l1_bound,
    a2q_plus_l1_bound,
    bits_for_range,
    datatype_bound_bits,
    input_range,
    min_accumulator_bits,
    tiled_accumulator_bits,
    worst_case_sums,
)


def brute_force_bits(q: list[int], n: int, signed: bool) -> tuple[int, int, int]:
    """(min sum, max sum, two's-complement bits) over every input vector, every prefix (sequential order)."""
    lo, hi = input_range(n, signed)
    smallest = largest = 0
    for x in itertools.product(range(lo, hi + 1), repeat=len(q)):
        s = 0
        for xi, qi in zip(x, q, strict=True):
            s += xi * qi
            smallest, largest = min(smallest, s), max(largest, s)
    return smallest, largest, bits_for_range(smallest, largest)


def _random_rows(seed: int, rows: int, k: int, m: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(1 << (m - 1)), 1 << (m - 1), (rows, k), generator=g)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_exact_rule_is_the_brute_force_worst_case(n, signed):
    q = _random_rows(n * 10 + signed, 12, 4, 4)
    bits = min_accumulator_bits(q, n, signed, "exact")
    lo, hi = worst_case_sums(q, n, signed)
    for i, row in enumerate(q.tolist()):
        s_min, s_max, b = brute_force_bits(row, n, signed)
        assert (int(lo[i]), int(hi[i])) == (s_min, s_max)
        assert int(bits[i]) == b


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_closed_forms_never_undercut_the_exact_figure(n, signed):
    q = _random_rows(7 + n, 400, 6, 5)
    q[:50] = q[:50].abs()  # one-sided rows
    q[50:100] = -q[50:100].abs()
    exact = min_accumulator_bits(q, n, signed, "exact")
    for rule in ("a2q", "a2q+"):
        assert bool((min_accumulator_bits(q, n, signed, rule) >= exact).all()), rule


def test_a2q_equals_exact_for_signed_inputs_and_negative_weights():
    """Signed inputs, all weights ≤ 0: x = −2^(N−1) everywhere reaches 2^(N−1)·‖q‖₁, A2Q's worst case."""
    q = -_random_rows(3, 200, 8, 6).abs()
    for n in (2, 4, 8):
        assert torch.equal(min_accumulator_bits(q, n, True, "a2q"), min_accumulator_bits(q, n, True, "exact"))


def test_a2q_plus_equals_exact_for_zero_sum_weights_and_unsigned_inputs():
    q = _random_rows(5, 300, 8, 6)
    q = torch.cat([q, -q], 1)  # every row sums to zero
    for n in (1, 4, 8):
        assert torch.equal(min_accumulator_bits(q, n, False, "a2q+"), min_accumulator_bits(q, n, False, "exact"))


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("n", [1, 3, 4, 8])
def test_integer_forms_match_the_published_formulas(n, signed):
    """A2Q: P = ⌈log2(2^(N−1_s)·‖q‖₁ + 1) + 1⌉; A2Q+ (zero-sum q): P = ⌈log2(‖q‖₁·(2^N − 1) + 2)⌉. Norms
    include powers of two and their neighbours, where float logs are fragile."""
    norms = sorted({v for k in range(1, 14) for v in (2**k - 1, 2**k, 2**k + 1)} | {2 * v for v in range(1, 60)})
    for l1 in norms:
        q = torch.tensor([[l1 // 2, -(l1 - l1 // 2)]]) if l1 % 2 == 0 else torch.tensor([[l1]])
        want_a2q = math.ceil(math.log2(2 ** (n - int(signed)) * l1 + 1) + 1)
        assert int(min_accumulator_bits(q, n, signed, "a2q")[0]) == want_a2q, l1
        if l1 % 2 == 0:  # zero-sum rows
            want_plus = math.ceil(math.log2(l1 * (2**n - 1) + 2))
            assert int(min_accumulator_bits(q, n, signed, "a2q+")[0]) == want_plus, l1


@pytest.mark.parametrize("P,n", [(16, 4), (14, 4), (12, 4), (20, 8), (32, 8)])
def test_l1_budgets_meet_their_closed_forms(P, n):
    """A weight vector at the L1 budget needs at most P bits by the matching closed form."""
    for signed in (False, True):
        budget = math.floor(a2q_l1_bound(P, n, signed))
        q = torch.tensor([[budget]])
        assert int(min_accumulator_bits(q, n, signed, "a2q")[0]) <= P
        assert int(min_accumulator_bits(torch.tensor([[budget + 1]]), n, signed, "a2q")[0]) == P + 1
    half = math.floor(a2q_plus_l1_bound(P, n) / 2)
    q = torch.tensor([[half, -half]])
    assert int(min_accumulator_bits(q, n, False, "a2q+")[0]) <= P
    assert int(min_accumulator_bits(torch.tensor([[half + 1, -half - 1]]), n, False, "a2q+")[0]) == P + 1


def test_a2q_plus_budget_is_about_twice_a2q_for_unsigned_inputs():
    assert a2q_plus_l1_bound(16, 4) / a2q_l1_bound(16, 4, False) == pytest.approx(2 * 16 / 15, rel=1e-3)
    assert a2q_plus_l1_bound(16, 8) / a2q_l1_bound(16, 8, True) == pytest.approx(256 / 255, rel=1e-3)


@pytest.mark.parametrize("signed", [False, True])
def test_datatype_bound_is_the_published_formula_and_covers_the_worst_weights(signed):
    for K, n, m in [(1, 1, 2), (9, 4, 4), (288, 4, 4), (1152, 8, 8), (4096, 8, 4), (100, 3, 5)]:
        alpha = math.log2(K) + n + m - 1 - int(signed)
        want = math.ceil(alpha + math.log2(1 + 2**-alpha) + 1)
        assert datatype_bound_bits(K, n, signed, m) == want
        worst = torch.full((1, K), -(1 << (m - 1)))  # every weight at the most negative code
        assert datatype_bound_bits(K, n, signed, m) >= int(min_accumulator_bits(worst, n, signed, "exact")[0])


def test_tiled_bits_are_per_tile_worst_cases():
    q = _random_rows(11, 6, 10, 4)
    tb = tiled_accumulator_bits(q, 3, False, tile=4)
    for i in range(q.shape[0]):
        parts = [q[i, j : j + 4] for j in range(0, 10, 4)]
        assert int(tb.inner[i]) == max(brute_force_bits(p.tolist(), 3, False)[2] for p in parts)
    assert torch.equal(tb.outer, min_accumulator_bits(q, 3, False))
    assert bool((tb.inner <= tb.outer).all())


@pytest.mark.parametrize(
    "call",
    [
        lambda: min_accumulator_bits(torch.ones(2, 3), 4, False, "nearest"),
        lambda: min_accumulator_bits(torch.tensor([[0.5, 1.0]]), 4, False),
        lambda: min_accumulator_bits(torch.tensor([[float("nan")]]), 4, False),
        lambda: min_accumulator_bits(torch.ones(2, 3), 0, False),
        lambda: min_accumulator_bits(torch.ones(2, 3), 4, False, tile=0),
        lambda: a2q_l1_bound(1, 4, False),
        lambda: datatype_bound_bits(0, 4, False, 4),
    ],
)
def test_bad_input_is_refused(call):
    with pytest.raises(ValueError):
        call()
