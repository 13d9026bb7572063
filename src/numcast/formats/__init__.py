"""Number formats: specs as data, element casts, scales, cast/quantize, QTensor."""

from numcast.formats.ops import cast, cast_stats, cast_ste, quantize
from numcast.formats.qtensor import QTensor
from numcast.formats.registry import get_format, list_formats, parse_format, register_format
from numcast.formats.spec import BF16, E4M3, E8M0, FP16, FP32, FloatElement, Format, IntElement, Scaling

__all__ = [
    "BF16", "E4M3", "E8M0", "FP16", "FP32", "FloatElement", "Format", "IntElement", "QTensor", "Scaling",
    "cast", "cast_stats", "cast_ste", "get_format", "list_formats", "parse_format", "quantize", "register_format",
]  # fmt: skip
