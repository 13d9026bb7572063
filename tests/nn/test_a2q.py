"""A2Q/A2Q+ layers: the guarantee holds after init, EP-init and training; exact export; clear refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from numcast.accumulator.bounds import min_accumulator_bits
from numcast.accumulator.simulate import accumulate, adversarial_inputs
from numcast.algorithms.ep_init import project_l1_ball
from numcast.formats.ops import quantize
from numcast.nn.a2q import A2QConv2d, A2QLinear, A2QWeightQuantizer, a2q_penalty, budget_met


def _conv(seed: int) -> nn.Conv2d:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Conv2d(16, 8, 3, padding=1)


def _calibrate(layer, x):
    layer.input_quant.start_calibration()
    layer(x)
    layer.input_quant.finish_calibration()


def _x(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).relu()


def _no_adversarial_overflow(q: torch.Tensor, n: int, signed: bool, P: int) -> bool:
    q = q.reshape(q.shape[0], -1).long()
    hits = sum(accumulate(adversarial_inputs(q, n, signed, s), q, P, paired=True).overflows.sum() for s in (1, -1))
    return int(hits) == 0


@pytest.mark.parametrize("rule", ["a2q", "a2q+"])
def test_training_keeps_the_guarantee_and_rtn_does_not(rule):
    P, N = 12, 4
    conv = _conv(0)
    layer = A2QConv2d(conv, 4, "uint4_tensor", P, rule)
    x = _x(1, 8, 16, 6, 6)
    _calibrate(layer, x)
    layer.weight_quant.ep_init_()
    target = conv(x).detach()
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    for _ in range(30):
        loss = F.mse_loss(layer(x), target) + 1e-3 * a2q_penalty(layer)
        opt.zero_grad()
        loss.backward()
        opt.step()
    q = layer.weight_quant.integer_weights().detach()
    assert budget_met(q, layer.weight_quant.budget, rule == "a2q+")
    assert int(min_accumulator_bits(q.long(), N, False, "exact").max()) <= P
    assert _no_adversarial_overflow(q, N, False, P)
    rtn = quantize(conv.weight.detach().reshape(8, -1), "int4_channel")
    q_rtn = (rtn.dequantize() / rtn.scales().reshape(-1, 1)).round()
    assert not _no_adversarial_overflow(q_rtn, N, False, P)  # the unconstrained layer overflows at this P


def test_gradients_reach_direction_norm_and_scale():
    layer = A2QLinear(nn.Linear(32, 4), 4, "int8_tensor", 16, "a2q")
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    _calibrate(layer, x)
    layer(x).square().sum().backward()
    wq = layer.weight_quant
    for p in (wq.v, wq.log2_g, wq.log2_s):
        assert p.grad is not None and bool(p.grad.abs().sum() > 0)


def test_penalty_is_relu_of_norm_over_budget():
    wq = A2QWeightQuantizer(torch.randn(4, 64, generator=torch.Generator().manual_seed(2)), 4, 12, 8, False, "a2q")
    over = wq.norm() - wq.scale() * wq.budget
    assert float(wq.penalty().detach()) == pytest.approx(float(over.clamp(min=0).sum()), rel=1e-6)
    assert float(over.max()) > 0  # 8-bit inputs, 12-bit accumulator: the float norms are over budget
    wq.ep_init_()
    assert float(wq.penalty().detach()) <= 1e-6 * float(wq.norm().sum())


def test_a2q_after_ep_init_is_round_toward_zero_of_the_projection():
    """Up to float rounding: g and s live as float32 log2 values, so a weight whose exact value is an integer
    (the channel's max, at 7 units) may land one ulp below it and truncate one step lower."""
    w = torch.randn(6, 40, generator=torch.Generator().manual_seed(4))
    wq = A2QWeightQuantizer(w, 4, 12, 4, False, "a2q")
    s = wq.scale().double()
    wq.ep_init_()
    want = torch.trunc(project_l1_ball(w.double(), s * wq.budget) / s[:, None])
    diff = (wq.integer_weights().detach() - want).abs()
    assert float(diff.max()) <= 1 and int((diff > 0).sum()) <= 0.02 * diff.numel()


@pytest.mark.parametrize(
    "cls,layer,shape", [(A2QLinear, nn.Linear(32, 6), (5, 32)), (A2QConv2d, _conv(3), (2, 16, 5, 5))]
)
def test_to_quant_is_the_same_function_with_the_same_codes(cls, layer, shape):
    a = cls(layer, 4, "uint8_tensor", 14, "a2q+")
    x = _x(5, *shape)
    _calibrate(a, x)
    a.weight_quant.ep_init_()
    qm = a.to_quant()
    torch.testing.assert_close(qm(x), a(x), rtol=0, atol=1e-6)
    codes = qm.qweight.dequantize() / qm.qweight.scales().reshape(-1, 1)
    assert torch.equal(codes.round().double(), a.weight_quant.integer_weights().detach())


def test_construction_is_deterministic():
    outs = []
    for _ in range(2):
        a = A2QConv2d(_conv(7), 3, "uint4_tensor", 13, "a2q+")
        x = _x(8, 4, 16, 5, 5)
        _calibrate(a, x)
        a.weight_quant.ep_init_()
        outs.append(a(x))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("fmt", ["mxfp8_e4m3", "fp8_e4m3_tensor", "mxint8", "int8_g32"])
def test_non_integer_inputs_are_refused(fmt):
    with pytest.raises(ValueError, match="integer|per-tensor"):
        A2QLinear(nn.Linear(64, 4), 4, fmt, 16)


def test_bad_rule_and_weights_are_refused():
    with pytest.raises(ValueError, match="rule"):
        A2QLinear(nn.Linear(8, 4), 4, "int8_tensor", 16, "a2q-plus")
    with pytest.raises(ValueError, match="NaN"):
        A2QWeightQuantizer(torch.tensor([[float("nan"), 1.0]]), 4, 16, 8, True)
