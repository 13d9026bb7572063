"""Integer weights and inputs as the accumulator sees them: which formats give integer dot products, the
integer codes of such a QTensor, and a QTensor rebuilt from integer codes with given scales."""

from __future__ import annotations

import torch

from numcast.formats.engine import grid_cast
from numcast.formats.qtensor import QTensor
from numcast.formats.registry import FormatLike, get_format
from numcast.formats.scale import Scales


def integer_sum_reason(fmt: FormatLike) -> str | None:
    """None if a weight in ``fmt`` makes each dot product one integer sum (integer element, no fraction bits, no
    zero point, one scale per output channel or tensor); else why not."""
    fmt = get_format(fmt)
    el, sc = fmt.element, fmt.scaling
    if el.kind != "int" or el.frac_bits or sc.zero_point or sc.granularity not in ("channel", "tensor"):
        return f"{fmt.label} weights are not integers with one scale per output channel or tensor"
    return None


def integer_input_format(name: FormatLike) -> str:
    """The integer input format an accumulator-aware layer uses for ``name``: ``int8``/``uint4`` (no scaling)
    become ``int8_tensor``/``uint4_tensor``; integer per-tensor formats stay; anything else is refused."""
    fmt = get_format(name)
    name = fmt.name
    el = fmt.element
    if el.kind != "int" or el.frac_bits:
        raise ValueError(f"accumulator-aware quantization needs integer layer inputs (intN / uintN), got {name!r}")
    if fmt.scaling.granularity == "none":
        return f"{fmt.name}_tensor"
    if fmt.scaling.granularity != "tensor" or fmt.scaling.zero_point:
        raise ValueError(
            "accumulator-aware quantization needs integer inputs with one symmetric input scale per tensor, "
            f"got {name!r}"
        )
    return fmt.name


def per_row(scales: torch.Tensor, rows: int) -> torch.Tensor:
    """One scale per weight row (float64 ``[rows]``) from per-channel or per-tensor scales."""
    s = scales.reshape(-1).double()
    return s if s.numel() == rows else s.expand(rows)


def integer_codes(qt: QTensor) -> torch.Tensor:
    """The integer weights ``[out, K]`` (float64) of a per-channel/per-tensor integer QTensor."""
    return (qt.dequantize().double() / per_row(qt.scales(), qt.shape[0])[:, None]).round()


def qtensor_from_codes(q: torch.Tensor, scales: torch.Tensor, fmt: FormatLike) -> QTensor:
    """The QTensor of integer weights ``q`` ``[out, K]`` with the given decoded (FP32-representable) scales."""
    fmt = get_format(fmt)
    s = scales.reshape(-1).double()
    r = grid_cast((q * per_row(s, q.shape[0])[:, None]).float(), fmt, rounding="nearest_even", scales=Scales(s))
    return QTensor.from_grid_cast(r, fmt, tuple(q.shape), torch.float32)  # q·s / s rounds back to q exactly
