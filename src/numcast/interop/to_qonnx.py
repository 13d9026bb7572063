"""numcast models as QONNX graphs (FINN, hls4ml): integer weights, integer activations and the accumulator width
numcast proved for every dot product, in one ``.onnx`` file.

The reader is the reference (PyPI ``qonnx`` 1.0.0; ``../shared/design/interop.md`` §3):

- ``Quant`` (domain ``qonnx.custom_op.general``, ``qonnx/custom_op/general/intquant.py`` ``int_quant``): inputs
  ``x, scale, zeropt, bitwidth``, attributes ``signed``, ``narrow``, ``rounding_mode``; y = (round(clamp(x / scale
  + zeropt, qmin, qmax)) − zeropt) · scale in numpy float32, qmin/qmax from ``min_int``/``max_int`` (``narrow``
  drops the most negative signed code), ``ROUND`` = ``np.round`` (half to even). Clamping before rounding equals
  numcast's rounding before clamping: the bounds are integers. ``bitwidth`` must be a 0-d initializer, else
  ``InferDataTypes`` silently falls back to FLOAT32.
- ``InferDataTypes`` gives a ``Quant`` output ``INT{b}``/``UINT{b}`` when its scale is 1 and its zero point 0
  (``SCALEDINT``/FLOAT32 otherwise), and overwrites a ``MatMul``/``Conv`` of integer inputs with ``INT32``
  (``UINT32`` if nothing is signed): qonnx's conservative container, which holds INT{P} for P ≤ 32; the
  exact width therefore also lives in the metadata below, where no transformation touches it.
- ``execute_onnx`` rounds every tensor annotated with an integer datatype and raises when that moves a value by
  more than its threshold (``sanitize_quant_values``): an ``INT{P}`` annotation is only valid on a tensor whose
  values are integers, so the accumulator is written as an integer tensor, before the scales.
- ``ExtractQuantScaleZeroPt`` (qonnx) rewrites a scaled ``Quant`` as ``Div(s) ─ Quant(scale 1) ─ Mul(s)``: the
  form used here, with the ``Mul`` moved past the linear Conv/MatMul and merged with the weight scales.

Graph layout (opset 11 + ``qonnx.custom_op.general`` v1, qonnx's preferred opsets; every tensor float32 with its
shape in ``value_info``; the batch size is the one of ``example_inputs`` — ``execute_onnx`` wants exact shapes, FINN
wants 1: qonnx's ``ChangeBatchSize``). A quantized Conv/Linear whose input quantizer is a static integer one (N bits,
FP32 scale s_x) and whose weights are integers q (b bits) with one float scale s_w per output channel or per tensor
becomes an integer core::

    x ─ Div(s_x) ─ Quant(scale 1, N, signed, narrow, ROUND) ─▶ {name}.x_int [INT{N} / UINT{N}]
    q (float initializer of integer codes) ─ Quant(scale 1, b, signed, narrow) ─▶ {name}.weight_int [INT{b}]
    Conv(x_int, w_int; strides, pads, dilations, group) / MatMul(x_int, w_intᵀ [in, out]) ─▶ {name}.acc [INT{P}]
    acc ─ Mul(fp32(s_x·s_w), [C,1,1] / [C]) ─ Add(bias [C,1,1] / [C]) ─▶ y

``x_int`` equals numcast's input codes bit for bit (x / s_x is the same float32 division, the same rounding and
clamp); ``acc`` is the exact integer dot product (partial sums are integers below 2^(P−1), exact in float32
whatever the summation order while P ≤ 25); P is numcast's exact bound (:func:`numcast.accumulator.bounds.
min_accumulator_bits`, the largest over output channels) — FINN's rule INT⌈log2 max(−min, 1+max)⌉+1 on
``qonnx.util.basic.calculate_matvec_accumulator_range`` gives the same figure (tested; FINN would pick UINT for a
range without negatives, numcast's figure is always signed). Linear is MatMul + Mul + Add (FINN's form), not Gemm.
The output differs from numcast's float forward (a float32 conv of fake-quantized operands) by float rounding only,
so a later activation can round the other way where x / s is within that noise of a half-integer.

A quantized layer without an input quantizer (weight-only quantization) has no integer input datatype: its weight is
written Brevitas-style, ``w (numcast's dequantized float32 weight) ─ Quant(s_w [C,1,1,1] / [1,C], b, signed,
narrow) ─▶ Conv/MatMul(x, ·)``, which gives numcast's weight back bit for bit (w / s_w rounds to the code), and its
accumulator is not annotated (``unannotated`` in the metadata). A layer's output quantizer, and an activation
quantizer module of the model, is ``Div(s) ─ Quant(1) ─ Mul(s)``: numcast's fake-quantized tensor (qonnx may give
−0 where numcast gives +0).

``narrow`` is 1 for a weight when no code is the most negative one (every amax-scaled or A2Q weight; Brevitas'
convention), else 0; for an activation it is the format's (numcast's ``int8_tensor`` clamps at −128: 0). Rounding:
numcast's ``nearest_even`` → ``ROUND``, ``floor`` → ``FLOOR``, ``ceil`` → ``CEIL``, ``toward_zero`` → ``DOWN``
(the last three up to 11 bits, where numcast divides in float32); anything else is refused.

Other modules: BatchNorm1d/2d (running statistics) → ``BatchNormalization`` (kept after the accumulator: folding it
would change the integer weights), ReLU → ``Relu``, residual ``+`` → ``Add``, MaxPool2d / AvgPool2d (no ceil
mode) → ``MaxPool``/``AveragePool``, AdaptiveAvgPool(1) → ``GlobalAveragePool``, flatten from dim 1 →
``Flatten(axis=1)``, Identity/Dropout → nothing; float ``nn.Conv1d/2d``/``nn.Linear`` layers numcast left in float →
float Conv/MatMul (listed in ``float_layers``). Anything else raises ``ValueError`` naming the module or function.
The model is traced by ``torch.fx`` (numcast's quantized layers and quantizers are leaves) and run once on one
example to get the shapes.

Refused (``ValueError`` naming the layer): weights that are not integers with a per-channel or per-tensor float
scale (block/group formats such as ``mxfp4`` and ``int4_g128``: QONNX's Quant has no block axis; minifloats,
NVFP4, zero points, fraction bits) — with ``float_fallback`` such a layer's dequantized weight is written as a float
initializer without ``Quant`` and listed in :attr:`ExportResult.float_layers`; dynamic activation quantizers (FINN
needs static scales) and non-integer activation formats, always. P must not exceed the layer's ``accumulator_bits``
in the run's report (the exact bits numcast recorded) nor the recipe's ``accumulator.bits`` budget.

Metadata (graph ``metadata_props``, where qonnx's ``ModelWrapper.get_metadata_prop`` reads): ``numcast.qonnx`` =
JSON {``layers``: name → {``weight``, ``input``, ``accumulator`` (``INT{P}`` or null), ``accumulator_tensor``,
``report_bits``, ``budget_bits``}, ``unannotated``: [names], ``float_layers``: name → why}. The file is
deterministic: the same model and example inputs give the same bytes.
"""

from __future__ import annotations

import json
import math
import operator
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from numcast.accumulator.bounds import min_accumulator_bits
from numcast.accumulator.codes import integer_sum_reason, per_row
from numcast.formats.element import decode
from numcast.formats.spec import FP32
from numcast.interop.source import ExportResult, ExportSource, quantized_layers
from numcast.nn.act_quant import ActQuantizer
from numcast.nn.modules import QuantConv1d, QuantConv2d, QuantLinear, QuantWeightModule

QUANT_DOMAIN = "qonnx.custom_op.general"
ONNX_OPSET = 11  # qonnx.util.basic.get_preferred_onnx_opset()
QUANT_OPSET = 1  # qonnx.util.basic.get_preferred_qonnx_opset()
METADATA_KEY = "numcast.qonnx"
ROUNDING_MODES = {"nearest_even": "ROUND", "floor": "FLOOR", "ceil": "CEIL", "toward_zero": "DOWN"}
FLOAT32_EXACT_BITS = 25  # two's-complement accumulators up to 25 bits hold integers |v| <= 2^24: exact in float32
SUPPORTED = ("numcast QuantConv1d/QuantConv2d/QuantLinear, nn.Conv1d/Conv2d/Linear, BatchNorm1d/2d, ReLU, residual "
             "add, MaxPool2d, AvgPool2d, AdaptiveAvgPool1d/2d(1), Flatten(1), Identity, Dropout")  # fmt: skip


# ---------------------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class ActSpec:
    """A static integer activation quantizer as a ``Quant``: FP32 ``scale``, ``bits``, ``signed``, ``narrow``,
    qonnx ``rounding`` mode, and the qonnx datatype name of its codes (``UINT8``)."""

    scale: float
    bits: int
    signed: bool
    narrow: bool
    rounding: str

    @property
    def datatype(self) -> str:
        return f"{'INT' if self.signed else 'UINT'}{self.bits}"


@dataclass(frozen=True)
class WeightSpec:
    """Integer weights ``codes`` ``[out, K]`` (float64 integers), per-row FP32-representable ``scales`` ``[out]``
    (float64), ``bits``, ``signed``, and ``narrow`` (no code is the most negative one)."""

    codes: torch.Tensor
    scales: torch.Tensor
    bits: int
    signed: bool
    narrow: bool

    @property
    def datatype(self) -> str:
        return f"{'INT' if self.signed else 'UINT'}{self.bits}"


def weight_refusal(m: QuantWeightModule) -> str | None:
    """None when QONNX's ``Quant`` stores ``m``'s weight exactly (integers, one float scale per output channel or
    tensor, at most FP32), else why not."""
    fmt = m.qweight.format
    if fmt.scaling.granularity == "block":
        return f"{fmt.label} is a block format (one scale per {fmt.scaling.block_size} values); QONNX/FINN have none"
    why = integer_sum_reason(fmt)
    if why:
        return f"{why}: QONNX's integer Quant cannot store it"
    sf = fmt.scaling.scale_format
    if fmt.scaling.scaled and (sf.bits > 32 or sf.emax > FP32.emax or sf.emin - sf.mbits < FP32.emin - FP32.mbits):
        return f"{fmt.label}: its {sf.name} scales are not FP32 values"
    return None


def weight_spec(m: QuantWeightModule) -> WeightSpec:
    """The integer weights and per-row scales of an accepted layer (:func:`weight_refusal` is None)."""
    qt = m.qweight
    el = qt.format.element
    codes = decode(qt.codes.reshape(qt.shape), el, torch.float64)
    rows = qt.shape[0]
    scales = per_row(qt.scales(), rows) if qt.scale_codes is not None else torch.ones(rows, dtype=torch.float64)
    narrow = el.narrow or not el.signed or bool((codes > el.qmin).all())
    return WeightSpec(codes, scales.clone(), el.bits, el.signed, narrow and el.signed)


def act_spec(layer: str, aq: ActQuantizer) -> ActSpec:
    """The ``Quant`` of a static integer activation quantizer; ``ValueError`` naming ``layer`` when QONNX cannot
    express it exactly."""
    fmt, el = aq.fmt, aq.fmt.element
    if aq.mode != "static":
        raise ValueError(f"{layer}: its input/output quantizer is dynamic ({fmt.label}); FINN needs static scales "
                         "(quantize with activation_mode='static' / --activation-mode static)")  # fmt: skip
    if el.kind != "int" or el.frac_bits or fmt.scaling.granularity != "tensor" or fmt.scaling.zero_point:
        raise ValueError(f"{layer}: activation format {fmt.label} is not an integer with one per-tensor scale; "
                         "QONNX's Quant exports only those")  # fmt: skip
    if not aq.calibrated:
        raise ValueError(f"{layer}: its static activation quantizer was never calibrated")
    mode = ROUNDING_MODES.get(fmt.rounding)
    if mode is None or (fmt.rounding != "nearest_even" and el.bits > 11):
        exact = ", ".join(ROUNDING_MODES)
        raise ValueError(f"{layer}: activation rounding {fmt.rounding!r} at {el.bits} bits has no exact QONNX "
                         f"rounding_mode (exact: {exact}; the last three up to 11 bits)")  # fmt: skip
    scales = aq.scales_for(float(aq.amax))
    scale = float(scales.scale.reshape(-1)[0].to(torch.float32))
    if scales.tensor_scale is not None or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{layer}: activation scale {scale} cannot be a QONNX Quant scale")
    return ActSpec(scale, el.bits, el.signed, el.narrow, mode)


def accumulator_bits(w: WeightSpec, a: ActSpec) -> int:
    """numcast's exact accumulator bits (largest over output channels) for integer weights ``w`` and inputs ``a``."""
    return int(min_accumulator_bits(w.codes, a.bits, a.signed, "exact").max())


def report_bits(report: dict | None) -> dict[str, int]:
    """Per-layer ``accumulator_bits`` of a run's report (name → the exact bits numcast recorded), empty without."""
    layers = (report or {}).get("layers") or []
    return {r["name"]: int(r["accumulator_bits"]) for r in layers if r.get("accumulator_bits") is not None}


def check_accumulator(name: str, P: int, input_dt: str, recorded: int | None, budget: int | None) -> None:
    """``ValueError`` unless the exact bound ``P`` fits the run's recorded figure and the recipe's budget."""
    for bits, what in ((recorded, "the run's report records"), (budget, "the recipe's accumulator budget is")):
        if bits is not None and P > bits:
            raise ValueError(f"{name}: its weights need a {P}-bit accumulator for {input_dt} inputs, but {what} "
                             f"{bits} bits; the model does not match its run")  # fmt: skip


# ---------------------------------------------------------------------------------------------- graph
@dataclass
class _Graph:
    """ONNX nodes, initializers, value shapes and qonnx datatype annotations, in emission order."""

    nodes: list = field(default_factory=list)
    inits: dict[str, np.ndarray] = field(default_factory=dict)
    shapes: dict[str, list[int]] = field(default_factory=dict)
    datatypes: dict[str, str] = field(default_factory=dict)

    def init(self, name: str, value) -> str:
        if name in self.inits:
            raise ValueError(f"internal: initializer {name!r} written twice")
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        self.inits[name] = np.array(value, dtype=np.float32, order="C")  # 0-d stays 0-d (qonnx: scalar bitwidth)
        return name

    def add(self, op: str, inputs: list[str], out: str, shape, domain: str = "", **attrs) -> str:
        from onnx import helper

        if out in self.shapes:
            raise ValueError(f"internal: tensor {out!r} written twice")
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, domain=domain, **attrs))
        self.shapes[out] = [int(d) for d in shape]
        return out

    def quant(self, x: str, out: str, shape, scale, bits: int, signed: bool, narrow: bool,
              rounding: str = "ROUND") -> str:  # fmt: skip
        """``Quant(x, scale, 0, bits)`` (scale: a float or an array broadcasting against ``x``)."""
        ins = [x, self.init(f"{out}.scale", scale), self.init(f"{out}.zeropt", 0.0), self.init(f"{out}.bitwidth", bits)]
        return self.add("Quant", ins, out, shape, QUANT_DOMAIN, signed=int(signed), narrow=int(narrow),
                        rounding_mode=rounding)  # fmt: skip


@dataclass
class _Export:
    """What the export collected besides the graph."""

    layers: dict[str, str] = field(default_factory=dict)
    float_layers: dict[str, str] = field(default_factory=dict)
    meta_layers: dict[str, dict] = field(default_factory=dict)
    unannotated: list[str] = field(default_factory=list)


@dataclass
class _Context:
    """The export's settings: ``float_fallback``, the report's per-layer bits, the recipe's budget; and results."""

    float_fallback: bool
    recorded: dict[str, int]
    budget: int | None
    export: _Export = field(default_factory=_Export)


def _conv_attrs(m: nn.Module, name: str) -> dict:
    nd = len(m.kernel_size)
    if isinstance(m.padding, str):
        if m.padding != "valid":
            raise ValueError(f"{name}: padding={m.padding!r} is not exported (pass explicit padding)")
        pads = [0] * nd
    else:
        pads = list(m.padding)
    if getattr(m, "static_padding", None) is not None:
        raise ValueError(f"{name}: a convolution with a static pre-padding module is not exported")
    if getattr(m, "padding_mode", "zeros") != "zeros":
        raise ValueError(f"{name}: padding_mode={m.padding_mode!r} is not exported")
    return {"kernel_shape": list(m.kernel_size), "strides": list(m.stride), "pads": pads + pads,
            "dilations": list(m.dilation), "group": int(m.groups)}  # fmt: skip


def _is_conv(m: nn.Module) -> bool:
    return isinstance(m, (QuantConv1d, QuantConv2d, nn.Conv1d, nn.Conv2d))


def _channel_shape(m: nn.Module, c: int) -> list[int]:
    """Broadcast shape of a per-output-channel vector against the layer's output."""
    return [c] + [1] * len(m.kernel_size) if _is_conv(m) else [c]


def _dot(g: _Graph, name: str, m: nn.Module, x: str, w: str, out: str, shape) -> str:
    if _is_conv(m):
        return g.add("Conv", [x, w], out, shape, **_conv_attrs(m, name))
    return g.add("MatMul", [x, w], out, shape)


def _weight_layout(m: nn.Module, rows: torch.Tensor) -> np.ndarray:
    """``[out, K]`` rows as the ONNX weight: the conv kernel ``[out, in/g, *k]`` or the MatMul ``[in, out]``."""
    if _is_conv(m):
        return rows.reshape(m.weight.shape).numpy()
    return rows.reshape(m.weight.shape).t().contiguous().numpy()


def _bias(g: _Graph, name: str, m: nn.Module, y: str, out: str, shape) -> str:
    if m.bias is None:
        return y
    b = m.bias.detach().float().reshape(_channel_shape(m, m.bias.numel()))
    return g.add("Add", [y, g.init(f"{name}.bias", b)], out, shape)


def _act_in(g: _Graph, tag: str, a: ActSpec, x: str, shape) -> str:
    """``Div(s) ─ Quant(1)``: the integer codes of ``x`` (annotated)."""
    d = g.add("Div", [x, g.init(f"{tag}.act_scale", a.scale)], f"{tag}.x_div_scale", shape)
    q = g.quant(d, f"{tag}.x_int", shape, 1.0, a.bits, a.signed, a.narrow, a.rounding)
    g.datatypes[q] = a.datatype
    return q


def _fake_quant(g: _Graph, tag: str, a: ActSpec, x: str, out: str, shape) -> str:
    """``Div(s) ─ Quant(1) ─ Mul(s)``: numcast's fake-quantized ``x``."""
    q = _act_in(g, tag, a, x, shape)
    return g.add("Mul", [q, g.init(f"{tag}.act_rescale", a.scale)], out, shape)


def _integer_layer(g: _Graph, name: str, m: QuantWeightModule, w: WeightSpec, a: ActSpec, x: str, out: str,
                   in_shape, out_shape, ctx: _Context) -> str:  # fmt: skip
    """The integer core (module docstring): Div, Quant, Quant(weights), Conv/MatMul [INT{P}], Mul, Add."""
    P = accumulator_bits(w, a)
    recorded = ctx.recorded.get(name)
    check_accumulator(name, P, a.datatype, recorded, ctx.budget)
    if P > FLOAT32_EXACT_BITS:
        why = "the annotation holds for integer hardware, but ONNX runtimes computing in float32 may round it"
        warnings.warn(f"{name}: an INT{P} accumulator exceeds float32's exact integers; {why}", stacklevel=2)
    xi = _act_in(g, name, a, x, in_shape)
    wq = g.init(f"{name}.weight_codes", _weight_layout(m, w.codes))
    wi = g.quant(wq, f"{name}.weight_int", g.inits[wq].shape, 1.0, w.bits, w.signed, w.narrow)
    g.datatypes[wi] = w.datatype
    acc = _dot(g, name, m, xi, wi, f"{name}.acc", out_shape)
    g.datatypes[acc] = f"INT{P}"
    s = (w.scales * a.scale).float().reshape(_channel_shape(m, w.scales.numel()))
    y = g.add("Mul", [acc, g.init(f"{name}.acc_scale", s)], f"{name}.y" if m.bias is not None else out, out_shape)
    y = _bias(g, name, m, y, out, out_shape)
    ex = ctx.export
    ex.layers[name] = f"Quant {w.datatype} weights, {a.datatype} inputs, INT{P} accumulator"
    ex.meta_layers[name] = {"weight": w.datatype, "input": a.datatype, "accumulator": f"INT{P}",
                            "accumulator_tensor": acc, "report_bits": recorded, "budget_bits": ctx.budget}  # fmt: skip
    return y


def _weight_only_layer(g: _Graph, name: str, m: QuantWeightModule, w: WeightSpec, x: str, out: str, out_shape,
                       ex: _Export) -> str:  # fmt: skip
    """Brevitas-style ``Quant(w, s_w)`` weights on a float input; the accumulator is not annotated."""
    scale_shape = [w.scales.numel()] + [1] * (m.weight.dim() - 1)
    wf = g.init(f"{name}.weight", m.weight.detach().float())
    scale = torch.where(w.scales == 0, 1.0, w.scales).float().reshape(scale_shape)  # a zero row: 0 / 0 would be NaN
    if not _is_conv(m):
        g.inits[wf] = np.array(g.inits[wf].T, order="C")
        scale = scale.reshape(1, -1)
    wi = g.quant(wf, f"{name}.weight_q", g.inits[wf].shape, scale, w.bits, w.signed, w.narrow)
    y = _dot(g, name, m, x, wi, f"{name}.y" if m.bias is not None else out, out_shape)
    ex.layers[name] = f"Quant {w.datatype} weights (float input: accumulator not annotated)"
    ex.meta_layers[name] = {"weight": w.datatype, "input": "FLOAT32", "accumulator": None,
                            "accumulator_tensor": None, "report_bits": None, "budget_bits": None}  # fmt: skip
    ex.unannotated.append(name)
    return _bias(g, name, m, y, out, out_shape)


def _float_layer(g: _Graph, name: str, m: nn.Module, x: str, out: str, out_shape) -> str:
    """A float Conv/MatMul with ``m``'s (dequantized) weight as the initializer."""
    w = m.weight.detach().float()
    w = g.init(f"{name}.weight", w if _is_conv(m) else w.t().contiguous())
    y = _dot(g, name, m, x, w, f"{name}.y" if m.bias is not None else out, out_shape)
    return _bias(g, name, m, y, out, out_shape)


def _quant_layer(g: _Graph, name: str, m: QuantWeightModule, x: str, out: str, in_shape, out_shape,
                 ctx: _Context) -> str:  # fmt: skip
    why = weight_refusal(m)
    ex = ctx.export
    if why and not ctx.float_fallback:
        raise ValueError(f"{name}: {why} (float_fallback / --float-fallback writes it unquantized)")
    a = act_spec(name, m.input_quant) if m.input_quant is not None else None
    y_out = out if m.output_quant is None else f"{name}.y_float"
    if why:
        ex.float_layers[name] = why
        if a is not None:
            x = _fake_quant(g, name, a, x, f"{name}.x_q", in_shape)
        y = _float_layer(g, name, m, x, y_out, out_shape)
    elif a is not None:
        y = _integer_layer(g, name, m, weight_spec(m), a, x, y_out, in_shape, out_shape, ctx)
    else:
        y = _weight_only_layer(g, name, m, weight_spec(m), x, y_out, out_shape, ex)
    if m.output_quant is not None:
        y = _fake_quant(g, f"{name}.out", act_spec(name, m.output_quant), y, out, out_shape)
    return y


# ---------------------------------------------------------------------------------------------- fx nodes
class _Tracer(fx.Tracer):
    """numcast's quantized layers and activation quantizers are leaves (their forward is what the graph writes)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (QuantWeightModule, ActQuantizer)) or super().is_leaf_module(m, qualname)


def _pool_attrs(m: nn.Module, name: str, nd: int) -> dict:
    if getattr(m, "ceil_mode", False) or getattr(m, "return_indices", False):
        raise ValueError(f"{name}: {type(m).__name__} with ceil_mode/return_indices is not exported")

    def tup(v):
        return [int(v)] * nd if isinstance(v, int) else [int(t) for t in v]

    stride = m.stride if m.stride is not None else m.kernel_size
    return {"kernel_shape": tup(m.kernel_size), "strides": tup(stride), "pads": tup(m.padding) * 2}


def _plain_module(g: _Graph, name: str, m: nn.Module, x: str, out: str, shape, in_shape) -> str | None:
    """Standard modules; None when ``m`` is not one the export knows."""
    if isinstance(m, (nn.Identity, nn.Dropout)):
        return x
    if isinstance(m, nn.ReLU):
        return g.add("Relu", [x], out, shape)
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if m.running_mean is None:
            raise ValueError(f"{name}: BatchNorm without running statistics is not exported")
        c = m.num_features
        gamma = m.weight.detach().float() if m.weight is not None else torch.ones(c)
        beta = m.bias.detach().float() if m.bias is not None else torch.zeros(c)
        stats = [g.init(f"{name}.mean", m.running_mean.float()), g.init(f"{name}.var", m.running_var.float())]
        ins = [x, g.init(f"{name}.gamma", gamma), g.init(f"{name}.beta", beta), *stats]
        return g.add("BatchNormalization", ins, out, shape, epsilon=float(m.eps))
    if isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
        size = m.output_size if isinstance(m.output_size, tuple) else (m.output_size,)
        if any(s != 1 for s in size):
            raise ValueError(f"{name}: {type(m).__name__}({m.output_size}) is not exported (only output size 1)")
        return g.add("GlobalAveragePool", [x], out, shape)
    if isinstance(m, nn.MaxPool2d):
        attrs = _pool_attrs(m, name, 2)
        dil = [m.dilation] * 2 if isinstance(m.dilation, int) else list(m.dilation)
        return g.add("MaxPool", [x], out, shape, dilations=dil, **attrs)
    if isinstance(m, nn.AvgPool2d):
        if m.divisor_override is not None:
            raise ValueError(f"{name}: AvgPool2d with divisor_override is not exported")
        return g.add("AveragePool", [x], out, shape, count_include_pad=int(m.count_include_pad),
                     **_pool_attrs(m, name, 2))  # fmt: skip
    if isinstance(m, nn.Flatten):
        return _flatten(g, name, x, out, shape, in_shape, m.start_dim, m.end_dim)
    return None


def _flatten(g: _Graph, name: str, x: str, out: str, shape, in_shape, start: int, end: int) -> str:
    if start != 1 or end not in (-1, len(in_shape) - 1):
        raise ValueError(f"{name}: flatten({start}, {end}) is not exported (only flatten from dim 1 to the end)")
    return g.add("Flatten", [x], out, shape, axis=1)


_MODE_DEPENDENT = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.Dropout)  # what model.train() changes
_ADD = (operator.add, torch.add, operator.iadd)
_RELU = (F.relu, torch.relu)


def _function(g: _Graph, node: fx.Node, args: list, out: str, shape, in_shape) -> str:
    """Supported ``call_function`` / ``call_method`` nodes: add of two tensors, relu, flatten."""
    what = node.target if node.op == "call_function" else f"Tensor.{node.target}"
    label = getattr(what, "__name__", str(what))
    tensors = [a for a in args if isinstance(a, str)]
    if node.target in (*_ADD, "add", "add_") and len(args) == len(tensors) == 2 and not node.kwargs:
        return g.add("Add", tensors, out, shape)
    if node.target in (*_RELU, "relu", "relu_") and len(args) == len(tensors) == 1:
        return g.add("Relu", tensors, out, shape)
    if node.target in (torch.flatten, "flatten") and tensors:
        start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
        end = args[2] if len(args) > 2 else node.kwargs.get("end_dim", -1)
        return _flatten(g, node.name, tensors[0], out, shape, in_shape, start, end)
    raise ValueError(f"{node.name}: function {label} (args {node.args!r}) is not supported by the QONNX export; "
                     f"supported: {SUPPORTED}")  # fmt: skip


# ---------------------------------------------------------------------------------------------- model
def _example_tensor(source: ExportSource) -> torch.Tensor:
    x = source.example_inputs
    if isinstance(x, (tuple, list)) and len(x) == 1:
        x = x[0]
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
        raise ValueError("the QONNX export traces the model on ExportSource.example_inputs: one float32 tensor batch "
                         f"is needed, got {type(x).__name__}")  # fmt: skip
    return x.detach().cpu()


def _trace(model: nn.Module, x: torch.Tensor) -> fx.GraphModule:
    """The fx graph of ``model`` with each node's output shape, propagated on one example (``x[:1]``: every
    supported op keeps the batch first, :func:`_shape` puts the batch size back)."""
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        gm = fx.GraphModule(model, _Tracer().trace(model))
    except Exception as exc:  # symbolic tracing fails on data-dependent control flow
        raise ValueError(f"{type(model).__name__} cannot be traced by torch.fx for the QONNX export ({exc})") from exc
    with torch.no_grad():
        ShapeProp(gm).propagate(x[:1])
    return gm


def _shape(node: fx.Node, batch: int) -> list[int]:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        raise ValueError(f"{node.name}: produces {type(meta).__name__}, not one tensor; the QONNX export needs tensors")
    if len(meta.shape) == 0 or meta.shape[0] != 1:
        raise ValueError(f"{node.name}: its output {tuple(meta.shape)} for one example does not keep the batch first")
    return [batch, *meta.shape[1:]]


def _check_quantizers(model: nn.Module) -> None:
    """Refuse what no graph can hold before running the model: every activation quantizer must be a static integer
    one QONNX expresses exactly (:func:`act_spec`), named by its layer."""
    for name, m in model.named_modules():
        if isinstance(m, ActQuantizer):
            act_spec(name.removesuffix(".input_quant").removesuffix(".output_quant"), m)


def _tensor_name(node: fx.Node, seen: dict[str, int]) -> str:
    """A readable ONNX tensor name: the module path (``stages.0.conv1``) or the fx node name; repeats numbered."""
    base = str(node.target) if node.op == "call_module" else node.name
    k = seen.get(base, 0)
    seen[base] = k + 1
    return base if k == 0 else f"{base}#{k}"


def _build(source: ExportSource, float_fallback: bool) -> tuple[_Graph, _Export, str, str]:
    """Walk the traced model and emit the graph; returns it, the collected facts and the input/output names."""
    x = _example_tensor(source)
    _check_quantizers(source.model)
    gm = _trace(source.model, x)
    budget = getattr(getattr(source.recipe, "accumulator", None), "bits", None)
    ctx = _Context(float_fallback, report_bits(source.report), budget)
    g = _Graph()
    env: dict[str, object] = {}
    seen: dict[str, int] = {}
    inp = out_name = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if inp is not None:
                raise ValueError("the QONNX export supports models with one input tensor")
            inp = node.name
            env[node.name] = inp
            g.shapes[inp] = list(x.shape)
            continue
        if node.op == "output":
            res = node.args[0]
            if not isinstance(res, fx.Node):
                raise ValueError("the QONNX export supports models with one output tensor")
            out_name = env[res.name]
            continue
        if node.op == "get_attr":
            raise ValueError(f"{node.name}: reads the attribute {node.target!r}; the QONNX export supports modules "
                             f"and a few functions ({SUPPORTED})")  # fmt: skip
        args = [env[a.name] if isinstance(a, fx.Node) else a for a in node.args]
        shape = _shape(node, x.shape[0])
        first = next((a for a in node.args if isinstance(a, fx.Node)), None)
        in_shape = _shape(first, x.shape[0]) if first is not None else None
        name = _tensor_name(node, seen)
        if node.op == "call_module":
            env[node.name] = _module(g, str(node.target), gm.get_submodule(node.target), args, name, shape, in_shape,
                                     ctx)  # fmt: skip
        else:
            env[node.name] = _function(g, node, args, name, shape, in_shape)
    return g, ctx.export, inp, out_name


def _module(g: _Graph, path: str, m: nn.Module, args: list, out: str, shape, in_shape, ctx: _Context) -> str:
    if len(args) != 1 or not isinstance(args[0], str):
        raise ValueError(f"{path}: {type(m).__name__} is called with {len(args)} arguments; one tensor is exported")
    x = args[0]
    if isinstance(m, (QuantConv1d, QuantConv2d, QuantLinear)):
        return _quant_layer(g, path, m, x, out, in_shape, shape, ctx)
    if isinstance(m, QuantWeightModule):
        raise ValueError(f"{path}: {type(m).__name__} is not supported by the QONNX export; supported: {SUPPORTED}")
    if isinstance(m, ActQuantizer):
        return _fake_quant(g, path, act_spec(path, m), x, out, shape)
    if type(m) in (nn.Conv1d, nn.Conv2d, nn.Linear):
        ctx.export.float_layers[path] = "not quantized by numcast (a float layer of the model)"
        return _float_layer(g, path, m, x, out, shape)
    y = _plain_module(g, path, m, x, out, shape, in_shape)
    if y is None:
        raise ValueError(f"{path}: {type(m).__name__} is not supported by the QONNX export; supported: {SUPPORTED}")
    return y


def _model_proto(g: _Graph, ex: _Export, source: ExportSource, inp: str, out: str):
    """The ``ModelProto`` (value_info for every intermediate tensor, qonnx datatype annotations, metadata)."""
    from onnx import TensorProto, helper, numpy_helper
    from qonnx.core.datatype import DataType
    from qonnx.core.modelwrapper import ModelWrapper

    def vi(name):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, g.shapes[name])

    inner = [vi(n) for n in g.shapes if n not in (inp, out)]
    inits = [numpy_helper.from_array(a, n) for n, a in g.inits.items()]
    graph = helper.make_graph(g.nodes, "numcast", [vi(inp)], [vi(out)], initializer=inits, value_info=inner)
    opsets = [helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid(QUANT_DOMAIN, QUANT_OPSET)]
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="numcast", producer_version=_version())
    proto.doc_string = f"numcast QONNX export of {source.name}"
    wrapper = ModelWrapper(proto, fix_missing_initializer_valueinfo=False)
    meta = {"layers": ex.meta_layers, "unannotated": ex.unannotated, "float_layers": ex.float_layers}
    wrapper.set_metadata_prop(METADATA_KEY, json.dumps(meta, sort_keys=True))  # graph-level, where qonnx reads
    for name, dt in g.datatypes.items():
        wrapper.set_tensor_datatype(name, DataType[dt])
    return wrapper


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("numcast")
    except PackageNotFoundError:
        return "unknown"


def _check_weights(g: _Graph) -> None:
    """Self-check with qonnx's own ``int_quant``: every weight Quant node reproduces numcast's weight bit for bit
    (its integer codes for the integer core; the dequantized weight for the Brevitas-style form)."""
    from qonnx.custom_op.general.quant import quant

    for n in g.nodes:
        if n.op_type != "Quant" or n.input[0] not in g.inits:
            continue
        attrs = {a.name: a.i if a.type == a.INT else a.s.decode() for a in n.attribute}
        w, s = g.inits[n.input[0]], g.inits[n.input[1]]
        got = quant(w, s, np.float32(0.0), g.inits[n.input[3]], attrs["signed"], attrs["narrow"],
                    attrs["rounding_mode"])  # fmt: skip
        if not np.array_equal(np.asarray(got, dtype=np.float32).view(np.int32), w.view(np.int32)):
            raise ValueError(f"{n.name}: qonnx's Quant does not give back numcast's weights bit for bit")


def write_qonnx(source: ExportSource, path: Path, float_fallback: bool) -> ExportResult:
    """Write ``source.model`` as one QONNX ``.onnx`` file at ``path`` (module docstring); returns the quantized
    layers' stored types (``layers``) and the layers written in float (``float_layers``, name → why)."""
    quantized_layers(source.model)
    training = [n for n, m in source.model.named_modules() if m.training and isinstance(m, _MODE_DEPENDENT)]
    if training:
        raise ValueError(f"{training[0]}: in training mode; the QONNX export writes the eval-mode model (model.eval())")
    g, ex, inp, out = _build(source, float_fallback)
    _check_weights(g)
    wrapper = _model_proto(g, ex, source, inp, out)
    Path(path).write_bytes(wrapper.model.SerializeToString(deterministic=True))
    return ExportResult(Path(path), "qonnx", dict(ex.layers), dict(ex.float_layers))
