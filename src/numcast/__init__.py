"""numcast: quantize neural networks to modern number formats, bit-exactly and fast."""

from numcast.formats import (
    Format,
    QTensor,
    cast,
    cast_stats,
    cast_ste,
    get_format,
    list_formats,
    quantize,
    register_format,
)
from numcast.jobs import export
from numcast.pipeline.quantize_model import quantize_model
from numcast.pipeline.recipe import Recipe

__version__ = "0.1.0"

__all__ = [
    "Format", "QTensor", "Recipe", "__version__", "cast", "cast_stats", "cast_ste", "export", "get_format",
    "list_formats", "quantize", "quantize_model", "register_format",
]  # fmt: skip
