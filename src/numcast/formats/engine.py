"""The cast engine: the one computation behind ``cast``, ``quantize``, ``QTensor.dequantize`` and the compiled
path.

Exposed to the rest of numcast (internal to the library; the public API is :mod:`numcast.formats.ops`):

- :func:`check_input`: the input checks every cast makes.
- :func:`grid_cast` → :class:`GridCast`: the element values (element units, rows layout) and the scales of a
  tensor in a format, the core every operation shares, so ``quantize(x).dequantize() == cast(x)`` bit for bit.
- :func:`dequantize_rows`: element values × scales (− zero point), the multiply ``cast`` and ``dequantize``
  share.
- :func:`cast_unchunked`: ``grid_cast`` and back in one call (what the compiled path fuses).
- :func:`saturated_rows`: which inputs were clipped to the grid's range (statistics, clipped STE).

Imports only the modules below it (spec, layout, rounding, element, scale); ``ops``, ``qtensor`` and
``fused`` import it, never the reverse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from numcast.formats.element import cast_element, work_dtype
from numcast.formats.layout import Layout
from numcast.formats.rounding import make_noise, round_to_int
from numcast.formats.scale import Scales, compute_scales, row_amax, sub_block_factors, two_level_tensor_scale
from numcast.formats.spec import Format, IntElement

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class GridCast:
    """A tensor cast onto a format's grid, before the scales are multiplied back (rows layout, ``[rows, n]``).

    - ``layout``: how the tensor maps to rows that share one scale.
    - ``element_input``: x / scale (+ zero point) in the work dtype, what the element cast rounded.
    - ``values``: the element grid values (element units) it rounded to.
    - ``scales``: the per-row scales (and tensor scale, zero points).
    - ``work``: the dtype the arithmetic ran in (float32 where exact, else float64).
    - ``element_scale``: each element's scale ([rows, n], work dtype) where sub-block offsets were found per
      element (the compiled cast, :func:`numcast.formats.scale.sub_block_factors`); else None.
    """

    layout: Layout
    element_input: torch.Tensor
    values: torch.Tensor
    scales: Scales
    work: torch.dtype
    f32_product: bool = False
    element_scale: torch.Tensor | None = None

    def output(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The dequantized tensor (what ``cast`` returns)."""
        if self.element_scale is not None:
            out = self.values * self.element_scale
        else:
            out = dequantize_rows(self.values, self.scales, self.work, self.f32_product and dtype == torch.float32)
        return self.layout.from_rows(out).reshape(shape).to(dtype)

    def rows_to_tensor(self, rows: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """A rows-layout tensor (e.g. a mask) back in the input's shape."""
        return self.layout.from_rows(rows).reshape(shape)


def check_input(x: torch.Tensor) -> None:
    """``TypeError`` unless ``x`` is a floating torch tensor numcast casts."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"numcast casts floating tensors (float32, float16, bfloat16, float64), got {x.dtype}")


def grid_cast(
    x: torch.Tensor,
    fmt: Format,
    rounding: str | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    scales: Scales | None = None,
    tensor_scale: torch.Tensor | float | None = None,
    own_scales: bool = False,
) -> GridCast:
    """Element values and scales of ``x`` in ``fmt`` (``rounding`` overrides the format's).

    ``scales`` fixes the scales (one per row of ``Layout.of(x.shape, fmt.scaling)``) instead of deriving
    them from ``x``: the solvers that quantize a weight column by column (GPTQ, Error Diffusion) fix a
    block's scale before its elements are rounded. For a format with sub-block offsets (shared
    microexponents) fixed scales must carry them too (``Scales.sub_offset``), else ``ValueError``.
    ``tensor_scale`` fixes only a two-level format's per-tensor scale (``x`` a slice of a larger tensor, whose
    :func:`tensor_scale_of` it is); the block scales are derived from ``x`` under it. ``own_scales``: the fixed
    ``scales`` are ``compute_scales`` of x's own rows (the compiled path computes them in a kernel of their own),
    so they hold what derived scales hold (below)."""
    check_input(x)
    rounding = rounding or fmt.rounding
    elem, scaling = fmt.element, fmt.scaling
    work = work_dtype(elem, scaling, x.dtype)
    layout = Layout.of(x.shape, scaling)
    rows = layout.to_rows(x.to(work))
    noise = None
    if rounding == "stochastic":
        noise = make_noise(rows.shape, rows.device, generator, seed)
    # scales derived here from each block's own values: a block holding NaN/inf gets a NaN scale, every other block
    # one that maps its amax into the grid's range or, saturated, one ≥ 1 (a scale format reaching 1), so y = x/s
    # holds no ±inf and the element cast leaves out the selects that handle it
    no_inf = scaling.scaled and (scales is None or own_scales) and scaling.scale_format.max >= 1.0
    own_per_element = own_scales and scales is not None and scales.sub_position is not None
    element_scale = None
    if not scaling.scaled:
        scales = Scales(None)
        y = rows
    else:
        if scales is None:
            scales = compute_scales(rows, elem, scaling, tensor_scale)
        elif bool(scaling.sub_block_size) != (scales.sub_offset is not None or own_per_element):
            need = ("carry its sub-block exponent offsets (Scales.sub_offset)" if scaling.sub_block_size
                    else "not carry sub-block offsets (it has none)")  # fmt: skip
            raise ValueError(f"{fmt.label}: scales fixed for this format must {need}")
        if scales.sub_offset is not None:  # shared microexponents: 2^(E − τ) per sub-block, exact
            y = rows * (1.0 / scales.per_element()).to(work)
        elif own_per_element:  # the compiled cast: the offsets found per element from the rows (exact)
            up, down = sub_block_factors(rows, scales, elem, scaling)
            y = rows * (scales.reciprocal(work)[:, None] * up)
            element_scale = scales.scale.to(work)[:, None] * down
        elif scaling.power_of_two:
            y = rows * scales.reciprocal(work)[:, None]  # exact: power of two
        else:  # in the work dtype, where a quotient cannot land on a decision point it is not at (work_dtype)
            y = rows / scales.effective().to(work)[:, None]
        if scales.zero_point is not None:
            # q = clamp(round(x/s) + z, 0, qmax): round first, then shift (PyTorch's fake_quantize order)
            zp = scales.zero_point.to(work)[:, None]
            q = round_to_int(y, rounding, noise) + zp
            values = torch.where(torch.isfinite(y), q.clamp(0, elem.qmax), torch.full_like(q, math.nan))
            return GridCast(layout, y + zp, values, scales, work)
    values = cast_element(y, elem, rounding, noise, fmt.saturate, no_inf=no_inf)
    if rounding in _MIRRORED and scaling.rule == "signed_max":  # a negative scale mirrors the direction
        mirrored = cast_element(y, elem, _MIRRORED[rounding], noise, fmt.saturate, no_inf=no_inf)
        values = torch.where((scales.scale < 0).to(y.device)[:, None], mirrored, values)
    return GridCast(layout, y, values, scales, work, two_level_f32(fmt), element_scale)


def tensor_scale_of(x: torch.Tensor, fmt: Format) -> torch.Tensor | None:
    """The per-tensor scale :func:`grid_cast` derives for the whole of ``x`` in a two-level format (NVFP4), as a
    0-dim float64 tensor; None for other formats. Slices of ``x`` cast with it get the whole tensor's bits. One
    pass without temporaries (``torch.aminmax``) where ``x`` is all finite: the max over the blocks' amax is then
    max |x| (zero padding aside, which does not change it)."""
    if not fmt.scaling.tensor_scale:
        return None
    if x.numel():
        lo, hi = torch.aminmax(x)
        amax = max(-float(lo), float(hi))
        if math.isfinite(amax):
            amax_t = torch.tensor([amax], dtype=torch.float64, device=x.device)
            return two_level_tensor_scale(amax_t, fmt.element, fmt.scaling.scale_format)
    rows = Layout.of(x.shape, fmt.scaling).to_rows(x.to(work_dtype(fmt.element, fmt.scaling, x.dtype)))
    return two_level_tensor_scale(row_amax(rows).double(), fmt.element, fmt.scaling.scale_format)


_MIRRORED = {"floor": "ceil", "ceil": "floor"}  # directed modes round the value x = y·s, not y


def dequantize_rows(
    values: torch.Tensor, scales: Scales, work: torch.dtype, f32_product: bool = False
) -> torch.Tensor:
    """Element values × scale (− zero point), in the work dtype (float64 for two-level scales, whose
    product q·s_b·s_t is exact there and is rounded once, to the output dtype). ``f32_product`` (a float32
    output of a format where :func:`two_level_f32` holds): (q·s_b)·s_t in float32 (the grid values q are exact
    there), the same single rounding in half the vector width."""
    s = scales.effective()
    if s is None:
        return values
    if scales.tensor_scale is not None and f32_product:
        t = torch.as_tensor(scales.tensor_scale, dtype=torch.float64, device=values.device).float()
        return (values.float() * scales.scale.float()[:, None]) * t
    if scales.tensor_scale is not None:
        return values.double() * s[:, None]
    if scales.sub_offset is not None:
        return values * scales.per_element().to(work)
    if scales.zero_point is not None:
        values = values - scales.zero_point.to(work)[:, None]
    return values * s.to(work)[:, None]


def two_level_f32(fmt: Format) -> bool:
    """Whether a two-level format's q·s_b is exact in float32 (element and scale significands ≤ 24 bits
    together, no overflow, lowest bit ≥ 2^−149; NVFP4: 2 + 4 bits, 2^−10 … 2688), so that for a float32 output
    fp32(q·s_b·s_t) is (q·s_b)·s_t in float32: one rounding of the exact product, as in float64."""
    el, sf = fmt.element, fmt.scaling.scale_format
    lsb = math.ldexp(1.0, -el.frac_bits) if isinstance(el, IntElement) else el.min_subnormal
    return (fmt.scaling.tensor_scale and el.bits + sf.mbits + 1 <= 24 and el.max * sf.max < 2.0**127
            and lsb * sf.min_subnormal >= 2.0**-149)  # fmt: skip


def cast_unchunked(
    x: torch.Tensor, fmt: Format, rounding: str | None = None, generator=None, seed=None, tensor_scale=None
) -> torch.Tensor:
    """``x`` cast to ``fmt`` in one piece (same shape and dtype); ``tensor_scale`` as in :func:`grid_cast`."""
    return grid_cast(x, fmt, rounding, generator, seed, tensor_scale=tensor_scale).output(x.shape, x.dtype)


def saturated_rows(r: GridCast, fmt: Format) -> torch.Tensor:
    """Boolean rows mask of finite inputs clipped to the grid's range."""
    elem = fmt.element
    if fmt.scaling.zero_point:
        return (r.element_input < 0) | (r.element_input > elem.qmax)
    lo = elem.qmin * 2.0**-elem.frac_bits if elem.kind == "int" else -elem.max
    return torch.isfinite(r.element_input) & ((r.element_input > elem.max) | (r.element_input < lo))
