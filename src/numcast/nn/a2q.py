"""A2Q / A2Q+ accumulator-aware weight quantizers (papers.md §3) and the layers that train with them.

:class:`A2QWeightQuantizer` keeps, per output channel i, a direction v_i, a norm g_i and a scale s_i (g and s
learned in the log2 domain, so they stay positive) and maps them to integer weights with
:func:`numcast.algorithms.ep_init.a2q_integer_weights`: zero-centring (A2Q+), L1 normalisation to
min(g_i/s_i, T), round toward zero with a straight-through gradient, clip to ±(2^(M−1) − 1). The float weight
is s_i·q_i. T comes from the layer's accumulator width P and its input format (N bits, signed or not), which
must therefore be an integer format: :class:`A2QLinear` / :class:`A2QConv2d` refuse anything else.

Training adds :meth:`A2QWeightQuantizer.penalty` = Σ_i ReLU(g_i − s_i·T) (weighted 1e-3 in the papers) so g
does not drift above the budget where it would get no gradient. Init: s_i = max|v_i|/(2^(M−1) − 1),
g_i = ‖v̄_i‖₁ (v̄ the zero-centred row for A2Q+, so the initial float weight is the centred row itself), or
EP-init (:meth:`A2QWeightQuantizer.ep_init_`).

``to_quant()`` turns a trained layer into the inference module (:class:`~numcast.nn.modules.QuantLinear` /
``QuantConv2d``) with an ``int{M}_channel`` weight whose codes are exactly q and whose FP32 scales are s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from numcast.accumulator.codes import integer_input_format, qtensor_from_codes
from numcast.algorithms.ep_init import A2Q_RULES, A2QRule, a2q_integer_weights, ep_init, initial_scale, l1_budget
from numcast.formats.qtensor import QTensor
from numcast.formats.registry import FormatLike
from numcast.nn.act_quant import ActQuantizer
from numcast.nn.modules import QuantConv2d, QuantLinear

_CONV_GEOMETRY = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups")
REGULARIZER_WEIGHT = 1e-3  # A2Q §4 / A2Q+ §4 (Brevitas' reg_weight)


def integer_input(input_format: FormatLike | ActQuantizer) -> tuple[ActQuantizer, int, bool]:
    """(quantizer, N, signed) for a layer input format that must be integer (``int8_tensor``, ``uint4_tensor``,
    plain ``int8`` meaning per-tensor static); ``ValueError`` otherwise."""
    q = input_format
    if not isinstance(q, ActQuantizer):
        q = ActQuantizer(integer_input_format(input_format), mode="static")
    integer_input_format(q.fmt)  # an integer per-tensor format, or a clear error
    el = q.fmt.element
    return q, el.bits, el.signed


class A2QWeightQuantizer(nn.Module):
    """Per-channel A2Q (``rule="a2q"``) or A2Q+ (``"a2q+"``) weight quantizer for a ``[out, ...]`` weight."""

    def __init__(self, weight: torch.Tensor, weight_bits: int, accumulator_bits: int, input_bits: int,
                 input_signed: bool, rule: A2QRule = "a2q+") -> None:  # fmt: skip
        super().__init__()
        if rule not in A2Q_RULES:
            raise ValueError(f"unknown accumulator-aware rule {rule!r}; one of {A2Q_RULES}")
        if not bool(torch.isfinite(weight).all()):
            raise ValueError("A2QWeightQuantizer: the weight contains NaN or Inf")
        self.rule, self.weight_bits, self.accumulator_bits = rule, weight_bits, accumulator_bits
        self.input_bits, self.input_signed = input_bits, input_signed
        self.shape = tuple(weight.shape)
        self.budget = l1_budget(rule, accumulator_bits, input_bits, input_signed)
        w = weight.detach().reshape(weight.shape[0], -1).float()
        s = initial_scale(w, weight_bits)
        c = w - w.mean(1, keepdim=True) if self.zero_center else w
        g = c.abs().sum(1)
        g = torch.where(g > 0, g, torch.ones_like(g))
        self.v = nn.Parameter(w.clone())
        self.log2_g = nn.Parameter(torch.log2(g))
        self.log2_s = nn.Parameter(torch.log2(s))

    @property
    def zero_center(self) -> bool:
        return self.rule == "a2q+"

    def scale(self) -> torch.Tensor:
        return torch.exp2(self.log2_s)

    def norm(self) -> torch.Tensor:
        return torch.exp2(self.log2_g)

    def integer_weights(self) -> torch.Tensor:
        """q ``[out, K]`` (float64 integers, straight-through gradient)."""
        return a2q_integer_weights(self.v, self.norm(), self.scale(), self.budget, self.weight_bits, self.zero_center)

    def forward(self) -> torch.Tensor:
        """The float weight s·q in the layer's weight shape (float32)."""
        w = self.integer_weights() * self.scale().double()[:, None]
        return w.float().reshape(self.shape)

    def penalty(self) -> torch.Tensor:
        """Σ ReLU(g − s·T) over channels (add ``REGULARIZER_WEIGHT`` × this to the loss)."""
        return F.relu(self.norm() - self.scale() * self.budget).sum()

    @torch.no_grad()
    def ep_init_(self) -> None:
        """EP-init in place (:func:`numcast.algorithms.ep_init.ep_init` with the current scales)."""
        init = ep_init(self.v.detach(), self.weight_bits, self.budget, self.scale().double())
        self.v.copy_(init.v.to(self.v.dtype))
        g = torch.minimum(self.norm().double(), init.s * self.budget)
        self.log2_g.copy_(torch.log2(torch.where(g > 0, g, torch.ones_like(g))).to(self.log2_g.dtype))

    @torch.no_grad()
    def qtensor(self) -> QTensor:
        """The integer weights as an ``int{M}_channel`` QTensor of the 2-D view: codes q, FP32 scales s."""
        fmt = f"int{self.weight_bits}_channel"
        return qtensor_from_codes(self.integer_weights().detach(), self.scale().detach(), fmt)

    def extra_repr(self) -> str:
        return (f"{self.rule}, W{self.weight_bits}, P={self.accumulator_bits}, input "
                f"{'int' if self.input_signed else 'uint'}{self.input_bits}, T={self.budget:.4g}")  # fmt: skip


class _A2QLayer(nn.Module):
    def _init_a2q(self, layer: nn.Module, weight_bits: int, input_format, accumulator_bits: int, rule: A2QRule,
               axis: int) -> None:  # fmt: skip
        self.input_quant, n, signed = integer_input(input_format)
        self.weight_quant = A2QWeightQuantizer(layer.weight, weight_bits, accumulator_bits, n, signed, rule)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        self.axis = axis

    def penalty(self) -> torch.Tensor:
        return self.weight_quant.penalty()

    def _quant_kwargs(self) -> dict:
        return {"qweight": self.weight_quant.qtensor(), "input_format": self.input_quant}


class A2QLinear(_A2QLayer):
    """``nn.Linear`` trained with an A2Q/A2Q+ weight quantizer and an integer input quantizer."""

    def __init__(self, linear: nn.Linear, weight_bits: int, input_format, accumulator_bits: int,
                 rule: A2QRule = "a2q+") -> None:  # fmt: skip
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._init_a2q(linear, weight_bits, input_format, accumulator_bits, rule, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quant(x), self.weight_quant(), self.bias)

    def to_quant(self) -> QuantLinear:
        lin = skip_init(nn.Linear, self.in_features, self.out_features, bias=self.bias is not None)
        if self.bias is not None:
            lin.bias.data = self.bias.detach().clone()
        fmt = f"int{self.weight_quant.weight_bits}_channel"
        return QuantLinear(lin, fmt, **self._quant_kwargs())


class A2QConv2d(_A2QLayer):
    """``nn.Conv2d`` (grouped included) trained with an A2Q/A2Q+ weight quantizer (rows ``[out, in/g·kh·kw]``)."""

    def __init__(self, conv: nn.Conv2d, weight_bits: int, input_format, accumulator_bits: int,
                 rule: A2QRule = "a2q+") -> None:  # fmt: skip
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"Conv2d with padding_mode={conv.padding_mode!r} is not supported")
        self.geometry = {k: getattr(conv, k) for k in _CONV_GEOMETRY}
        self._init_a2q(conv, weight_bits, input_format, accumulator_bits, rule, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        return F.conv2d(self.input_quant(x), self.weight_quant(), self.bias, g["stride"], g["padding"], g["dilation"],
                        g["groups"])  # fmt: skip

    def to_quant(self) -> QuantConv2d:
        c = skip_init(nn.Conv2d, **self.geometry, bias=self.bias is not None)  # no init: the global RNG stays
        if self.bias is not None:
            c.bias.data = self.bias.detach().clone()
        fmt = f"int{self.weight_quant.weight_bits}_channel"
        return QuantConv2d(c, fmt, **self._quant_kwargs())


def a2q_penalty(model: nn.Module) -> torch.Tensor:
    """Σ of every A2Q layer's :meth:`A2QWeightQuantizer.penalty` in ``model`` (0 if none)."""
    terms = [m.penalty() for m in model.modules() if isinstance(m, A2QWeightQuantizer)]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def budget_met(q: torch.Tensor, budget: float, zero_center: bool) -> bool:
    """Whether integer weights ``[out, K]`` meet the L1 budget T (A2Q: ‖q‖₁ ≤ T; A2Q+: Σq⁺, Σ|q⁻| ≤ T/2)."""
    q = q.reshape(q.shape[0], -1).double()
    if zero_center:
        half = torch.maximum(q.clamp(min=0).sum(1), (-q).clamp(min=0).sum(1))
        return bool((half <= budget / 2).all())
    return bool((q.abs().sum(1) <= budget).all())
