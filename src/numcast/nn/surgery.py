"""Model surgery: which modules numcast can quantize, and swapping a module in place by its dotted name."""

from __future__ import annotations

from torch import nn

from numcast.nn.modules import QuantConv1d, QuantConv2d, QuantEmbedding, QuantLinear

QUANT_TYPES: dict[type, type] = {
    nn.Linear: QuantLinear,
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Embedding: QuantEmbedding,
}
FLOAT_BY_DESIGN = ("Norm", "BatchNorm", "LayerNorm", "GroupNorm", "RMSNorm")  # kept in float, not an error


# Subclasses whose forward numcast reproduces: the static 'same' padding module is applied before the conv.
KNOWN_SUBCLASSES: dict[str, type] = {"Conv2dStaticSamePadding": QuantConv2d}


def quant_class(module: nn.Module) -> type | None:
    """The numcast class that replaces ``module``, or None. Exact type match (a subclass may change forward),
    plus the subclasses in :data:`KNOWN_SUBCLASSES`."""
    cls = QUANT_TYPES.get(type(module))
    if cls is None and isinstance(module, nn.Conv2d):
        cls = KNOWN_SUBCLASSES.get(type(module).__name__)
    return cls


def why_not_quantizable(module: nn.Module) -> str:
    name = type(module).__name__
    if any(k in name for k in FLOAT_BY_DESIGN):
        return f"{name} stays in float (normalisation layers are not quantized)"
    if "Router" in name:
        return f"{name} stays in float (a mixture-of-experts router picks the experts; it is not quantized)"
    if isinstance(module, (nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return f"{name} is not supported by numcast yet"
    return f"{name} has parameters but no numcast quantized counterpart"


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` with ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
