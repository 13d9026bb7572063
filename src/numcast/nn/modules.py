"""Quantized layers: weights stored as a packed :class:`~numcast.formats.qtensor.QTensor`, dequantized once
(cached) for a float forward; optional input and output activation quantizers. The cached float weight can be
released (:meth:`QuantWeightModule.release_float_weight`): the block-wise runner does so for every block it has
finished, so that the quantize phase holds only codes; the first use decodes it again.

Blocks run along the reduction axis: Linear weights [out, in] along ``in``; convolution weights
[out, in/groups, *k] are viewed as [out, in/groups·Πk] (grouped and depthwise convolutions included), and
convolution inputs are blocked along their channel axis.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from numcast.formats.ops import quantize
from numcast.formats.qtensor import PackedQTensor, QTensor, compact
from numcast.formats.registry import FormatLike, get_format
from numcast.nn.act_quant import ActQuantizer


class QuantWeightModule(nn.Module):
    """The base of numcast's quantized layers: holds ``qweight`` (QTensor of the 2-D view) and a cached float
    ``weight`` of the module's shape (a non-persistent buffer, decoded again on first use once released), and the
    optional input and output quantizers."""

    weight_shape: tuple[int, ...]
    _weight_like: torch.Tensor  # empty: the device and dtype of the float weight, moved by .to() like a buffer

    def _init_quant(
        self,
        weight: torch.Tensor,
        weight_format: FormatLike,
        qweight: QTensor | None,
        input_format: FormatLike | ActQuantizer | None,
        output_format: FormatLike | ActQuantizer | None,
        act_axis: int,
    ) -> None:
        self.weight_format = get_format(weight_format)
        self.weight_shape = tuple(weight.shape)
        view = weight.detach().reshape(weight.shape[0], -1)
        cached = None
        if qweight is None:  # round to nearest with the format's scaling, blocks along the reduction axis; the
            # cast gives the float weight too (no second decode of the codes)
            cached = torch.empty(view.shape, dtype=torch.float32, device=view.device)
            qweight = quantize(view.float(), self.weight_format, out=cached)
        if tuple(qweight.shape) != tuple(view.shape):
            raise ValueError(f"qweight shape {qweight.shape} does not match the weight view {tuple(view.shape)}")
        self.qweight = qweight
        cached = (qweight.dequantize() if cached is None else cached).reshape(self.weight_shape)
        self._weight_like = cached.new_empty(0)
        self.register_buffer("weight", cached, persistent=False)
        self.input_quant = _act(input_format, act_axis)
        self.output_quant = _act(output_format, act_axis)

    def set_qweight(self, qweight: QTensor) -> None:
        """Replace the quantized weight (a solver's result); a cached float weight is refreshed."""
        self.qweight = qweight
        if self._buffers.get("weight") is not None:
            self.weight = self._decoded_weight()

    @property
    def qweight(self) -> QTensor | None:
        """The quantized weight (None while spilled to disk). Held packed (:meth:`release_float_weight`), it is
        unpacked on its first read, bit for bit, and kept so."""
        packed = self.__dict__.get("_packed_qweight")
        if packed is not None:
            self.__dict__["_qweight"], self.__dict__["_packed_qweight"] = packed.unpack(), None
        return self.__dict__.get("_qweight")

    @qweight.setter
    def qweight(self, qt: QTensor | None) -> None:
        self.__dict__["_qweight"], self.__dict__["_packed_qweight"] = qt, None

    def _has_codes(self) -> bool:
        return self.__dict__.get("_qweight") is not None or self.__dict__.get("_packed_qweight") is not None

    def release_float_weight(self, pack: bool = False) -> None:
        """Free the cached float weight (its codes stay; the next read of ``weight`` decodes it again, on the
        device and in the dtype the module has been moved to). ``pack``: the codes are held as
        :func:`~numcast.formats.qtensor.compact` keeps them (4-bit ones packed two to a byte) until ``qweight`` is
        next read. A module without codes (spilled to disk) keeps what it has."""
        if not self._has_codes():
            return
        self._buffers["weight"] = None
        qt = self.__dict__.get("_qweight")
        held = compact(qt) if pack and qt is not None else qt
        if isinstance(held, PackedQTensor):
            self.__dict__["_packed_qweight"], self.__dict__["_qweight"] = held, None

    def _decoded_weight(self) -> torch.Tensor:
        like = self._weight_like
        return self.qweight.dequantize().reshape(self.weight_shape).to(device=like.device, dtype=like.dtype)

    def __getattr__(self, name: str):
        buffers = self.__dict__["_buffers"]
        if name == "weight" and "weight" in buffers and buffers["weight"] is None and self._has_codes():
            buffers["weight"] = self._decoded_weight()  # released: decoded again, and cached
        return super().__getattr__(name)

    def _apply(self, fn, recurse=True):
        self._weight_like = fn(self._weight_like)  # .to(device / dtype) moves where a released weight decodes to
        return super()._apply(fn, recurse)

    def _quantized_io(self, x: torch.Tensor, fn) -> torch.Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        y = fn(x)
        return self.output_quant(y) if self.output_quant is not None else y


def _act(fmt, axis: int) -> ActQuantizer | None:
    if fmt is None or isinstance(fmt, ActQuantizer):
        return fmt
    return ActQuantizer(fmt, axis=axis)


class QuantLinear(QuantWeightModule):
    """``nn.Linear`` with a quantized weight (and optionally quantized input/output)."""

    def __init__(self, linear: nn.Linear, weight_format: FormatLike, *, qweight=None, input_format=None,
                 output_format=None) -> None:  # fmt: skip
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self._init_quant(linear.weight.detach(), weight_format, qweight, input_format, output_format, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._quantized_io(
            x, lambda t: F.linear(t, self.weight.to(t.dtype), None if self.bias is None else self.bias.to(t.dtype))
        )

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, weight={self.weight_format.label}"


class _QuantConvNd(QuantWeightModule):
    _conv = None

    def __init__(self, conv, weight_format: FormatLike, *, qweight=None, input_format=None, output_format=None):
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"{type(conv).__name__} with padding_mode={conv.padding_mode!r} is not supported")
        for k in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
            setattr(self, k, getattr(conv, k))
        # TF-style 'same' convolutions (EfficientNet's Conv2dStaticSamePadding) pad before the convolution
        pre = getattr(conv, "static_padding", None)
        self.static_padding = pre if isinstance(pre, nn.Module) else None
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self._init_quant(conv.weight.detach(), weight_format, qweight, input_format, output_format, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def run(t):
            if self.static_padding is not None:
                t = self.static_padding(t)
            b = None if self.bias is None else self.bias.to(t.dtype)
            return type(self)._conv(
                t, self.weight.to(t.dtype), b, self.stride, self.padding, self.dilation, self.groups
            )

        return self._quantized_io(x, run)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, k={self.kernel_size}, s={self.stride}, "
                f"groups={self.groups}, weight={self.weight_format.label}")  # fmt: skip


class QuantConv1d(_QuantConvNd):
    """``nn.Conv1d`` with a quantized weight viewed as [out, in/groups·k]."""

    _conv = staticmethod(F.conv1d)


class QuantConv2d(_QuantConvNd):
    """``nn.Conv2d`` (incl. grouped and depthwise) with a quantized weight viewed as [out, in/groups·kh·kw]."""

    _conv = staticmethod(F.conv2d)


class QuantEmbedding(QuantWeightModule):
    """``nn.Embedding`` with a quantized table [num, dim] (blocks along ``dim``); opt-in in recipes."""

    def __init__(self, emb: nn.Embedding, weight_format: FormatLike, *, qweight=None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = (
            emb.num_embeddings,
            emb.embedding_dim,
            emb.padding_idx,
        )
        self._init_quant(emb.weight.detach(), weight_format, qweight, None, None, -1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight, self.padding_idx)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, weight={self.weight_format.label}"
