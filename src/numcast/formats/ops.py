"""The public operations: ``cast`` (fake quantization), ``quantize`` (codes + scales) and ``cast_ste``.

One core computes, for every format, the element values (in element units, rows layout) and the scales;
``cast`` multiplies them back, ``quantize`` encodes them, and ``QTensor.dequantize`` decodes and runs the
same multiply, so ``quantize(x).dequantize() == cast(x)`` bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from numcast.formats.element import cast_element, work_dtype
from numcast.formats.layout import Layout
from numcast.formats.registry import FormatLike, get_format
from numcast.formats.rounding import make_noise, round_to_int
from numcast.formats.scale import Scales, compute_scales
from numcast.formats.spec import Format

if TYPE_CHECKING:
    from numcast.formats.qtensor import QTensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class CoreResult:
    layout: Layout
    y: torch.Tensor  # element input (rows, work dtype): x / scale (+ zero point)
    values: torch.Tensor  # element grid values (rows, work dtype)
    scales: Scales
    work: torch.dtype

    def output(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The dequantized tensor (what ``cast`` returns)."""
        out = dequantize_rows(self.values, self.scales, self.work)
        return self.layout.from_rows(out).reshape(shape).to(dtype)

    def rows_to_tensor(self, rows: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        return self.layout.from_rows(rows).reshape(shape)


def check_input(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"numcast casts floating tensors (float32, float16, bfloat16, float64), got {x.dtype}")


def core(
    x: torch.Tensor,
    fmt: Format,
    rounding: str | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    scales: Scales | None = None,
) -> CoreResult:
    """Element values and scales of ``x`` in ``fmt`` (see module docstring).

    ``scales`` fixes the scales (one per row of ``Layout.of(x.shape, fmt.scaling)``) instead of deriving
    them from ``x``: the solvers that quantize a weight column by column (GPTQ, Error Diffusion) fix a
    block's scale before its elements are rounded."""
    check_input(x)
    rounding = rounding or fmt.rounding
    elem, scaling = fmt.element, fmt.scaling
    work = work_dtype(elem, scaling, x.dtype)
    layout = Layout.of(x.shape, scaling)
    rows = layout.to_rows(x.to(work))
    noise = None
    if rounding == "stochastic":
        noise = make_noise(rows.shape, rows.device, generator, seed)
    if not scaling.scaled:
        scales = Scales(None)
        y = rows
    else:
        scales = scales if scales is not None else compute_scales(rows, elem, scaling)
        if scaling.rule != "amax":
            y = rows * (1.0 / scales.scale).to(work)[:, None]  # exact: power of two
        elif scaling.tensor_scale:  # s_b·s_t needs ~28 bits: divide in float64, round once to `work`
            y = (rows.double() / scales.effective()[:, None]).to(work)
        else:
            y = rows / scales.effective().to(work)[:, None]
        if scales.zero_point is not None:
            # q = clamp(round(x/s) + z, 0, qmax): round first, then shift (PyTorch's fake_quantize order)
            zp = scales.zero_point.to(work)[:, None]
            q = round_to_int(y, rounding, noise) + zp
            values = torch.where(torch.isfinite(y), q.clamp(0, elem.qmax), torch.full_like(q, math.nan))
            return CoreResult(layout, y + zp, values, scales, work)
    values = cast_element(y, elem, rounding, noise, fmt.saturate)
    return CoreResult(layout, y, values, scales, work)


def dequantize_rows(values: torch.Tensor, scales: Scales, work: torch.dtype) -> torch.Tensor:
    """Element values × scale (− zero point), in the work dtype (float64 for two-level scales, whose
    product q·s_b·s_t is exact there and is rounded once, to the output dtype)."""
    s = scales.effective()
    if s is None:
        return values
    if scales.tensor_scale is not None:
        return values.double() * s[:, None]
    if scales.zero_point is not None:
        values = values - scales.zero_point.to(work)[:, None]
    return values * s.to(work)[:, None]


BACKENDS = ("eager", "compiled")


CHUNK_ELEMENTS = 1 << 18  # ~1 MiB of float32: an eager chunk's ~20 temporaries stay in L2 and the allocator


def _cast_whole(x: torch.Tensor, fmt: Format, rounding: str | None, generator=None, seed=None) -> torch.Tensor:
    return core(x, fmt, rounding, generator, seed).output(x.shape, x.dtype)


def cast_eager(x: torch.Tensor, fmt: Format, rounding: str | None = None, generator=None, seed=None) -> torch.Tensor:
    """The eager cast. Large tensors whose scales are per row (block, channel, none) run in chunks of
    ~CHUNK_ELEMENTS: the same per-row arithmetic, so the same bits, without streaming ~20 full-size
    temporaries through memory (about 4x faster on a 64 MiB tensor here). Per-tensor and two-level
    scales (which need the whole tensor's amax) and stochastic rounding (one noise draw) run whole."""
    check_input(x)
    sc = fmt.scaling
    mode = rounding or fmt.rounding
    if x.numel() <= 2 * CHUNK_ELEMENTS or sc.granularity == "tensor" or sc.tensor_scale or mode == "stochastic":
        return _cast_whole(x, fmt, rounding, generator, seed)
    if not sc.scaled:  # element-wise: any slicing will do
        flat = x.reshape(-1)
        out = torch.empty_like(flat)
        for i in range(0, flat.numel(), CHUNK_ELEMENTS):
            out[i : i + CHUNK_ELEMENTS] = _cast_whole(flat[i : i + CHUNK_ELEMENTS], fmt, rounding)
        return out.reshape(x.shape)
    layout = Layout.of(x.shape, sc)
    rows = layout.to_rows(x)
    # the rows are already laid out: blocks run along their last axis, channels are their first
    row_fmt = fmt.with_(scaling=replace(sc, axis=-1 if sc.granularity == "block" else 0))
    out = torch.empty_like(rows)
    step = max(1, CHUNK_ELEMENTS // rows.shape[1])
    for i in range(0, rows.shape[0], step):
        out[i : i + step] = _cast_whole(rows[i : i + step], row_fmt, rounding)
    return layout.from_rows(out).reshape(x.shape)


def cast(
    x: torch.Tensor,
    fmt: FormatLike,
    *,
    rounding: str | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    backend: str = "eager",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fake-quantize ``x`` to ``fmt``: same shape and dtype, every value on the format's grid.

    ``rounding`` overrides the format's default (``nearest_even``); ``stochastic`` needs ``generator`` or
    ``seed`` and never touches the global RNG. Results are exact (bit-identical to the spec's real-number
    definition) when the output dtype can hold the grid; a narrower input dtype (bfloat16/float16) gets
    the values rounded to it on return. ``backend="compiled"`` runs the same arithmetic fused by
    ``torch.compile`` (:mod:`numcast.formats.fused`), bit-identical and several times faster on large
    tensors once compiled; stochastic rounding always runs eager. ``out``: a preallocated tensor of x's
    shape and dtype to copy the result into.
    """
    fmt = get_format(fmt)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; one of {BACKENDS}")
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype or out.device != x.device):
        raise ValueError(f"out must match x: {tuple(x.shape)} {x.dtype} {x.device}, got "
                         f"{tuple(out.shape)} {out.dtype} {out.device}")  # fmt: skip
    mode = rounding or fmt.rounding
    if backend == "compiled" and mode != "stochastic":
        from numcast.formats.fused import compiled_cast_fn

        check_input(x)
        res = compiled_cast_fn(fmt, mode)(x)
    else:
        res = cast_eager(x, fmt, rounding, generator, seed)
    return res if out is None else out.copy_(res)


def quantize(
    x: torch.Tensor,
    fmt: FormatLike,
    *,
    rounding: str | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> QTensor:
    """Quantize ``x`` to a :class:`~numcast.formats.qtensor.QTensor` (codes + scales + format)."""
    from numcast.formats.qtensor import QTensor

    fmt = get_format(fmt)
    r = core(x, fmt, rounding, generator, seed)
    return QTensor.from_core(r, fmt, tuple(x.shape), x.dtype)


class _STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fmt, rounding, generator, seed, mask_outside):  # noqa: D102
        r = core(x.detach(), fmt, rounding, generator, seed)
        if mask_outside:
            ctx.save_for_backward(r.rows_to_tensor(~saturated_rows(r, fmt), x.shape))
        ctx.mask_outside = mask_outside
        return r.output(x.shape, x.dtype)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        if ctx.mask_outside:
            (keep,) = ctx.saved_tensors
            grad = grad * keep
        return grad, None, None, None, None, None


def cast_ste(
    x: torch.Tensor,
    fmt: FormatLike,
    *,
    rounding: str | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    mask_outside: bool = False,
) -> torch.Tensor:
    """``cast`` with a straight-through gradient (d cast/dx = 1).

    With ``mask_outside`` the gradient is zeroed where the value saturated (|x| beyond the largest
    representable magnitude of its block), the usual clipped STE.
    """
    return _STE.apply(x, get_format(fmt), rounding, generator, seed, mask_outside)


def saturated_rows(r: CoreResult, fmt: Format) -> torch.Tensor:
    """Boolean rows mask of finite inputs clipped to the grid's range."""
    elem = fmt.element
    if fmt.scaling.zero_point:
        return (r.y < 0) | (r.y > elem.qmax)
    lo = elem.qmin * 2.0**-elem.frac_bits if elem.kind == "int" else -elem.max
    return torch.isfinite(r.y) & ((r.y > elem.max) | (r.y < lo))


def cast_stats(x: torch.Tensor, fmt: FormatLike, **kw) -> tuple[torch.Tensor, dict]:
    """``cast`` plus error figures: MSE, SQNR (dB), max abs error, fractions saturated and flushed to zero,
    NaN/inf counts of input and output. Non-finite positions are excluded from the error figures."""
    fmt = get_format(fmt)
    r = core(x, fmt, kw.get("rounding"), kw.get("generator"), kw.get("seed"))
    out = r.output(x.shape, x.dtype)
    sat = r.rows_to_tensor(saturated_rows(r, fmt), x.shape)
    xd, od = x.double(), out.double()
    fin = torch.isfinite(xd) & torch.isfinite(od)
    err = (od - xd)[fin]
    sig = xd[fin]
    mse = float(err.square().mean()) if err.numel() else 0.0
    p_sig = float(sig.square().mean()) if sig.numel() else 0.0
    n = max(x.numel(), 1)
    stats = {
        "format": fmt.label,
        "numel": x.numel(),
        "mse": mse,
        "sqnr_db": 10 * math.log10(p_sig / mse) if mse > 0 and p_sig > 0 else (math.inf if mse == 0 else -math.inf),
        "max_abs_err": float(err.abs().max()) if err.numel() else 0.0,
        "frac_saturated": float(sat.sum()) / n,
        "frac_flushed_to_zero": float(((xd != 0) & torch.isfinite(xd) & (od == 0)).sum()) / n,
        "nan_in": int(torch.isnan(xd).sum()),
        "inf_in": int(torch.isinf(xd).sum()),
        "nan_out": int(torch.isnan(od).sum()),
        "inf_out": int(torch.isinf(od).sum()),
    }
    return out, stats
