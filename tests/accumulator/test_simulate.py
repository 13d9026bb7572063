"""The P-bit accumulator simulator against a plain Python loop, the int64 matmul, and the bounds."""

from __future__ import annotations

import pytest
import torch

from numcast.accumulator.bounds import input_range, min_accumulator_bits
from numcast.accumulator.simulate import accumulate, adversarial_inputs


def loop_reference(x, q, P, mode, tile=None, tile_bits=None):
    """Term by term in Python integers: (y [B][out], events [out])."""

    def step(acc, t, bits):
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        s = acc + t
        if lo <= s <= hi:
            return s, 0
        if mode == "saturate":
            return min(max(s, lo), hi), 1
        return (s - lo) % (1 << bits) + lo, 1

    ys, events = [], [0] * len(q)
    for row in x:
        yrow = []
        for o, w in enumerate(q):
            terms = [a * b for a, b in zip(row, w, strict=True)]
            acc = 0
            if tile is None:
                for t in terms:
                    acc, e = step(acc, t, P)
                    events[o] += e
            else:
                for j in range(0, len(terms), tile):
                    inner = 0
                    for t in terms[j : j + tile]:
                        inner, e = step(inner, t, tile_bits)
                        events[o] += e
                    acc, e = step(acc, inner, P)
                    events[o] += e
            yrow.append(acc)
        ys.append(yrow)
    return ys, events


def _ints(seed, shape, lo, hi):
    return torch.randint(lo, hi + 1, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", ["wrap", "saturate"])
@pytest.mark.parametrize("tile", [None, 3])
@pytest.mark.parametrize("P", [5, 7])
def test_matches_a_python_loop(mode, tile, P):
    x, q = _ints(1, (7, 11), -8, 7), _ints(2, (5, 11), -7, 7)
    tile_bits = None if tile is None else P - 1
    r = accumulate(x, q, P, mode, tile=tile, tile_bits=tile_bits, chunk_elements=60)  # several chunks
    ys, events = loop_reference(x.tolist(), q.tolist(), P, mode, tile, tile_bits)
    assert r.y.tolist() == ys
    assert r.overflows.tolist() == events
    assert sum(events) > 0  # the case exercises overflow
    assert torch.equal(r.exact, x @ q.T)


def test_wide_accumulator_is_the_int64_matmul():
    x, q = _ints(3, (64, 300), 0, 255), _ints(4, (16, 300), -128, 127)
    r = accumulate(x, q, 40)
    assert torch.equal(r.y, x @ q.T) and int(r.overflows.sum()) == 0 and not r.overflowed


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("mode", ["wrap", "saturate"])
def test_adversarial_inputs_reach_the_exact_bound(signed, mode):
    """At the exact width nothing overflows, even adversarially; one bit less and some channel does."""
    q = _ints(5, (32, 64), -7, 7)
    n = 4
    need = min_accumulator_bits(q, n, signed, "exact")
    P = int(need.max())
    for sign in (1, -1):
        x = adversarial_inputs(q, n, signed, sign)
        lo, hi = input_range(n, signed)
        assert int(x.min()) >= lo and int(x.max()) <= hi
        assert int(accumulate(x, q, P, mode, paired=True).overflows.sum()) == 0
    hits = sum(accumulate(adversarial_inputs(q, n, signed, s), q, P - 1, mode, paired=True).overflows for s in (1, -1))
    assert bool((hits[need == P] > 0).all())  # exactly the channels that need P bits overflow at P - 1
    assert bool((hits[need < P] == 0).all())


def test_adversarial_sums_are_the_worst_over_random_inputs():
    q = _ints(6, (8, 20), -7, 7)
    adv = accumulate(adversarial_inputs(q, 4, False), q, 40, paired=True).exact[0]
    rand = accumulate(_ints(7, (2000, 20), 0, 15), q, 40).exact
    assert bool((rand <= adv).all()) and bool((rand.max(0).values < adv + 1).all())


@pytest.mark.parametrize(
    "call",
    [
        lambda: accumulate(torch.ones(2, 3), torch.ones(4, 3), 16, "round"),
        lambda: accumulate(torch.ones(2, 3), torch.ones(4, 2), 16),
        lambda: accumulate(torch.full((2, 3), 0.5), torch.ones(4, 3), 16),
        lambda: accumulate(torch.ones(2, 3), torch.ones(4, 3), 0),
        lambda: accumulate(torch.ones(2, 3), torch.ones(4, 3), 16, tile=2),
        lambda: accumulate(torch.ones(2, 3), torch.ones(4, 3), 16, paired=True),
        lambda: adversarial_inputs(torch.ones(2, 3), 4, False, sign=0),
    ],
)
def test_bad_input_is_refused(call):
    with pytest.raises(ValueError):
        call()
