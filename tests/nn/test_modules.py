"""Quantized modules compute exactly the float op on cast weights (and cast activations)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_bitwise
from torch import nn

from numcast.formats.engine import grid_cast
from numcast.formats.ops import cast
from numcast.formats.registry import get_format
from numcast.formats.spec import Scaling
from numcast.nn import ActQuantizer, QuantConv1d, QuantConv2d, QuantEmbedding, QuantLinear


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("wfmt", ["mxfp4", "nvfp4", "int4_g128", "int8_channel", "fp8_e4m3"])
def test_quant_linear_equals_linear_on_cast_weight_and_input(wfmt):
    torch.manual_seed(0)
    lin = nn.Linear(256, 40)
    q = QuantLinear(lin, wfmt, input_format="mxfp8_e4m3")
    x = torch.randn(5, 7, 256, generator=gen(1))
    ref = F.linear(cast(x, "mxfp8_e4m3"), cast(lin.weight.detach(), wfmt), lin.bias.detach())
    assert_bitwise(q(x), ref, wfmt)
    assert_bitwise(q.qweight.dequantize(), cast(lin.weight.detach(), wfmt), "packed weight")
    per_channel = 32 / 256 if get_format(wfmt).scaling.granularity == "channel" else 0  # one FP32 scale per row
    bits = q.qweight.nbytes * 8 / lin.weight.numel()
    assert bits == pytest.approx(get_format(wfmt).bits_per_value + per_channel, abs=0.01)


@pytest.mark.parametrize("groups", [1, 4, 32])
def test_quant_conv2d_blocks_run_along_the_reduction_axis(groups):
    torch.manual_seed(1)
    conv = nn.Conv2d(32, 64, 3, padding=1, stride=2, groups=groups)
    q = QuantConv2d(conv, "mxfp4", input_format="mxfp6_e2m3", output_format="int8_tensor")
    w2 = conv.weight.detach().reshape(64, -1)
    wq = cast(w2, "mxfp4").reshape(conv.weight.shape)
    assert_bitwise(q.weight, wq, "weight view [O, C/g*kh*kw]")
    x = torch.randn(2, 32, 9, 9, generator=gen(2))
    xq = cast(x.movedim(1, -1).contiguous(), "mxfp6_e2m3").movedim(-1, 1)  # blocks along channels
    y = F.conv2d(xq, wq, conv.bias.detach(), 2, 1, 1, groups)
    assert_bitwise(q(x), cast(y, "int8_tensor"), f"groups={groups}")


def test_quant_conv1d():
    conv = nn.Conv1d(16, 8, 5, padding=2)
    q = QuantConv1d(conv, "int4_g32")
    x = torch.randn(3, 16, 20, generator=gen(3))
    wq = cast(conv.weight.detach().reshape(8, -1), "int4_g32").reshape(conv.weight.shape)
    assert_bitwise(q(x), F.conv1d(x, wq, conv.bias.detach(), padding=2), "conv1d")


def test_quant_embedding_and_set_qweight():
    emb = nn.Embedding(50, 64)
    q = QuantEmbedding(emb, "mxfp4")
    ids = torch.tensor([[1, 2, 49]])
    assert_bitwise(q(ids), cast(emb.weight.detach(), "mxfp4")[ids], "embedding")
    lin = nn.Linear(32, 8)
    ql = QuantLinear(lin, "int4_g32")
    from numcast.algorithms.rtn import rtn

    other = rtn(torch.randn(8, 32, generator=gen(4)), "int4_g32")
    ql.set_qweight(other)
    assert torch.equal(ql.weight, other.dequantize())
    with pytest.raises(ValueError, match="does not match"):
        QuantLinear(lin, "int4_g32", qweight=rtn(torch.randn(8, 16), "int4_g32"))


def test_a_layer_decodes_given_codes_once_and_its_own_rounding_never(monkeypatch):
    """Building a quantized layer costs one decode of a solver's codes (none when it rounds its own weight: the
    cast gives the float weight), not one more for ``register_buffer``'s attribute check; the weight is the same."""
    from numcast.algorithms.rtn import rtn
    from numcast.formats.qtensor import QTensor

    decodes = []
    real = QTensor.dequantize
    monkeypatch.setattr(QTensor, "dequantize", lambda self: decodes.append(1) or real(self))
    lin = nn.Linear(96, 24)
    for fmt in ("mxfp4", "nvfp4", "int4_g32"):
        own = QuantLinear(lin, fmt)
        assert not decodes, fmt
        given = QuantLinear(lin, fmt, qweight=rtn(lin.weight, fmt))
        assert len(decodes) == 1, fmt
        decodes.clear()
        assert_bitwise(own.weight, given.weight, fmt)
        assert_bitwise(own.weight, cast(lin.weight.detach(), fmt), fmt)


def test_a_released_float_weight_is_decoded_again_where_the_module_was_moved():
    lin = nn.Linear(64, 16)
    q = QuantLinear(lin, "mxfp4")
    x = torch.randn(3, 64, generator=gen(5))
    y = q(x)
    q.release_float_weight()
    assert q._buffers["weight"] is None and "weight" not in dict(q.named_buffers())  # the memory is gone
    assert_bitwise(q(x), y, "forward after release")  # decoded again on use, and cached
    assert q._buffers["weight"] is not None
    q.release_float_weight()
    q.double()  # a move while released: the weight decodes in the module's new dtype
    assert q.weight.dtype == torch.float64 and torch.equal(q.weight, cast(lin.weight.detach(), "mxfp4").double())
    from numcast.algorithms.rtn import rtn

    other = rtn(torch.randn(16, 64, generator=gen(6)), "mxfp4")
    q.release_float_weight()
    q.set_qweight(other)  # stays released: no decode until used
    assert q._buffers["weight"] is None
    assert torch.equal(q.weight, other.dequantize().double())


@pytest.mark.parametrize("fmt", ["mxfp4", "int4_g32", "mxfp6_e3m2", "int8_channel"])
def test_release_with_pack_holds_4_bit_codes_packed_and_gives_them_back_bit_for_bit(fmt):
    """``release_float_weight(pack=True)`` keeps 4-bit codes as their packed bytes (QTensor.nbytes, not a byte per
    code) until ``qweight`` is read; the read gives the same codes and scales, and the forward the same bits.
    Other widths keep their QTensor."""
    lin = nn.Linear(96, 24)
    q = QuantLinear(lin, fmt)
    x = torch.randn(3, 96, generator=gen(7))
    want_y, want = q(x), q.qweight
    q.release_float_weight(pack=True)
    packed = q.__dict__["_packed_qweight"]
    if get_format(fmt).element.bits == 4:
        assert len(packed.data) == want.nbytes < want.codes.numel() and q.__dict__["_qweight"] is None
    else:
        assert packed is None and q.__dict__["_qweight"] is want
    assert_bitwise(q(x), want_y, "forward after a packed release")  # decoded through the unpacked codes
    got = q.qweight
    assert torch.equal(got.codes, want.codes) and torch.equal(got.scale_codes, want.scale_codes)
    assert q.__dict__["_packed_qweight"] is None and q.qweight is got  # unpacked once, and kept


def test_static_activation_observers():
    x = torch.randn(100_000, generator=gen(5)) * 3
    x[0:6:2] = 40.0  # three outliers (on the observer's sampling stride)
    amax = {}
    for obs in ("minmax", "percentile", "mse"):
        a = ActQuantizer("int8_tensor", mode="static", observer=obs)
        with pytest.raises(RuntimeError, match="before calibration"):
            a(x)
        a.start_calibration()
        assert torch.equal(a(x), x)  # observes, passes through
        a.finish_calibration()
        amax[obs] = float(a.amax)
        y = a(x)
        s = amax[obs] / 127
        assert torch.allclose(y, (x / s).round().clamp(-128, 127) * s, rtol=0, atol=s * 1e-3)
    assert amax["minmax"] == 40.0
    assert amax["percentile"] < 40.0
    assert 0 < amax["mse"] < 40.0  # clipping the outlier lowers the MSE of the rest


@pytest.mark.parametrize("fmt,lo", [("int8_tensor", -2.0), ("uint4_tensor", 0.0)])
def test_static_activation_gradient_is_straight_through_inside_the_range(fmt, lo):
    a = ActQuantizer(fmt, mode="static")
    a.start_calibration()
    a(torch.tensor([-2.0, 2.0]))
    a.finish_calibration()
    x = torch.tensor([-3.0, -1.0, -0.5, 0.5, 1.9, 2.5], requires_grad=True)
    y = a(x)
    assert torch.equal(y.detach(), a(x.detach()))  # same values with and without a graph
    y.sum().backward()
    want = ((x.detach() >= lo) & (x.detach() <= 2.0)).float()
    assert torch.equal(x.grad, want)
    a.bypass = True
    assert a(x) is x


@pytest.mark.parametrize("fmt", ["int8_tensor", "uint4_tensor", "int4_tensor", "intn8_tensor", "uint8_tensor"])
def test_static_integer_fast_path_equals_the_general_cast(fmt):
    a = ActQuantizer(fmt, mode="static")
    a.start_calibration()
    a(torch.tensor([-3.0, 3.0]))
    a.finish_calibration()
    scale = float(a.scales_for(3.0).scale)
    g = gen(9)
    x = torch.cat([torch.randn(10_000, generator=g) * 2, torch.arange(-300, 301) * scale * 0.5,  # (near-)ties
                   torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 50.0, -50.0])])  # fmt: skip
    fast = a(x)
    general = grid_cast(x, a.fmt, scales=a.scales_for(3.0)).output(x.shape, x.dtype)
    assert torch.equal(fast.view(torch.int32), general.view(torch.int32))  # bit for bit, signed zeros and NaNs


def test_activation_quantizer_refuses_bad_settings():
    with pytest.raises(ValueError, match="per-tensor"):
        ActQuantizer("mxfp8_e4m3", mode="static")
    with pytest.raises(ValueError, match="mode"):
        ActQuantizer("int8_tensor", mode="sometimes")
    a = ActQuantizer("int8_tensor", mode="static")
    a.start_calibration()
    with pytest.raises(ValueError, match="no calibration data"):
        a.finish_calibration()
    assert isinstance(get_format("int8_tensor").scaling, Scaling)
