"""RTN: round every weight to nearest with the format's own scaling (the baseline every method must beat)."""

from __future__ import annotations

import torch

from numcast.formats.ops import quantize
from numcast.formats.qtensor import QTensor
from numcast.formats.registry import FormatLike


def rtn(weight: torch.Tensor, fmt: FormatLike) -> QTensor:
    """Quantize a weight [out, in] (or a conv weight [out, in/groups, *k], viewed as [out, in/groups·Πk]
    so blocks run along the reduction axis) to ``fmt`` with round-to-nearest-even. Returns the QTensor of
    the 2-D view; ``.dequantize().reshape(weight.shape)`` is the quantized weight."""
    return quantize(weight.detach().reshape(weight.shape[0], -1).float(), fmt)
