"""Quantized modules (fake-quant forward over packed QTensor weights) and model surgery."""

from numcast.nn.act_quant import ActQuantizer
from numcast.nn.modules import QuantConv1d, QuantConv2d, QuantEmbedding, QuantLinear

__all__ = ["ActQuantizer", "QuantConv1d", "QuantConv2d", "QuantEmbedding", "QuantLinear"]
