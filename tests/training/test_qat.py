"""A2Q/A2Q+ QAT: the guarantee holds after training (bounds and simulator), it learns, it is deterministic."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from numcast.accumulator.bounds import min_accumulator_bits
from numcast.accumulator.codes import integer_codes
from numcast.evaluate.accumulator import analyze_model
from numcast.nn.a2q import A2QConv2d, A2QLinear
from numcast.training.qat import QATConfig, export_a2q, prepare_a2q, train_qat


def tiny_net() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4),
        )  # fmt: skip


def data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    images = torch.randn(n, 1, 8, 8, generator=g) * 0.5
    images[torch.arange(n), 0, labels * 2, :] += 2.0  # a learnable pattern: the class picks a bright row
    return images, labels


@pytest.mark.parametrize("rule", ["a2q", "a2q+"])
def test_qat_keeps_every_channel_within_budget_and_learns(rule):
    P = 12
    images, labels = data()
    model = prepare_a2q(tiny_net(), images[:64], accumulator_bits=P, rule=rule, input_bits=4, weight_bits=4)
    layers = [m for m in model.modules() if isinstance(m, (A2QConv2d, A2QLinear))]
    assert [m.input_quant.fmt.name for m in layers] == ["int8_tensor", "uint4_tensor", "uint4_tensor"]
    res = train_qat(model, images, labels, QATConfig(epochs=3, batch_size=32, lr=1e-2, progress=False, threads=1))
    assert sum(res.losses[-8:]) / 8 < sum(res.losses[:8]) / 8
    for m in layers:
        wq = m.weight_quant
        q = wq.integer_weights().detach().long()
        assert int(min_accumulator_bits(q, wq.input_bits, wq.input_signed, "exact").max()) <= P
        assert int(min_accumulator_bits(q, wq.input_bits, wq.input_signed, rule).max()) <= P
    exported = export_a2q(model)
    x = images[:16]
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x), rtol=0, atol=1e-5)
    rows, skipped = analyze_model(exported, [x], 8, P)
    assert not skipped and len(rows) == 3
    assert all(r.channels_overflowing_adversarial == 0 and r.overflows_real == 0 for r in rows)
    for m, e in zip(layers, [m for m in exported.modules() if hasattr(m, "qweight")], strict=True):
        assert torch.equal(integer_codes(e.qweight), m.weight_quant.integer_weights().detach())


def test_qat_is_deterministic_and_leaves_the_global_rng_alone():
    images, labels = data(128)
    state = torch.random.get_rng_state()
    outs = []
    for _ in range(2):
        model = prepare_a2q(tiny_net(), images[:32], accumulator_bits=13)
        train_qat(model, images, labels, QATConfig(epochs=1, batch_size=32, progress=False, threads=1))
        outs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(state, torch.random.get_rng_state())


def test_unconstrained_layers_would_overflow_at_that_width():
    """The float model's per-channel int4 RTN weights need more than the width QAT respects (the test can fail)."""
    images, _ = data(64)
    model = prepare_a2q(tiny_net(), images, accumulator_bits=11, ep_init=False, rule="a2q")
    conv = [m for m in model.modules() if isinstance(m, A2QConv2d)][1]
    w = conv.weight_quant.v.detach()
    s = w.abs().amax(1, keepdim=True) / 7
    assert int(min_accumulator_bits((w / s).round().long(), 4, False).max()) > 11


def test_refusals():
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        prepare_a2q(nn.Sequential(nn.ReLU()), torch.zeros(2, 3))
    model = prepare_a2q(tiny_net(), data(16)[0])
    with pytest.raises(ValueError, match="as many"):
        train_qat(model, torch.zeros(4, 1, 8, 8), torch.zeros(3, dtype=torch.long), QATConfig(progress=False))
