"""The public operations (exposed): ``cast`` (fake quantization), ``quantize`` (codes + scales),
``cast_ste`` (straight-through gradient) and ``cast_stats`` (error figures).

All of them run one engine (:mod:`numcast.formats.engine`, internal): :func:`~numcast.formats.engine.grid_cast`
computes, for every format, the element values (element units, rows layout) and the scales; ``cast``
multiplies them back, ``quantize`` encodes them, and ``QTensor.dequantize`` decodes and runs the same
multiply, so ``quantize(x).dequantize() == cast(x)`` bit for bit. Imports go one way:
``ops → fused, qtensor → engine``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import torch

from numcast.formats.engine import cast_unchunked, check_input, grid_cast, saturated_rows, tensor_scale_of
from numcast.formats.fused import (
    KernelKey,
    compiled_cast,
    compiler_available,
    fresh_output,
    kernel_key,
    writes_into,
)
from numcast.formats.layout import Layout
from numcast.formats.qtensor import QTensor
from numcast.formats.registry import FormatLike, get_format
from numcast.formats.spec import Format
from numcast.libc import advise_huge_pages

BACKENDS = ("auto", "eager", "compiled")

AUTO_MIN_ELEMENTS = 1 << 20
"""``backend="auto"`` compiles a cast from this many elements on (4 MiB of float32). Below it the eager cast
takes at most a few ms, so the first call's compile (seconds, once per format, dtype and device: kernels are
shape-dynamic) would take a thousand calls or more to pay back; above it each call saves ~5x."""

_AUTO_EAGER: dict[KernelKey, str] = {}  # kernels "auto" found unusable (compile error, other bits): eager, and why
_AUTO_CHECKED: set[tuple[KernelKey, bool]] = set()  # kernels (writing into out or not) whose first "auto" result
# equalled the eager cast bit for bit


CHUNK_ELEMENTS = 1 << 18  # ~1 MiB of float32: an eager chunk's ~20 temporaries stay in L2 and the allocator
# On a GPU a chunk costs ~20 kernel launches whatever its size: chunks of 2^18 left the eager MXFP4 cast of a
# 1 GiB tensor launch-bound on an H200 (408 ms; 12.4 ms with chunks of 2^24, whose temporaries take ~1.3 GiB;
# benchmarks/results/formats_cuda_chunk262144.json against formats_cuda.json)
DEVICE_CHUNK_ELEMENTS = 1 << 24


def chunk_elements(x: torch.Tensor) -> int:
    """The length (elements) of the slices the eager cast and ``quantize`` work in on ``x``'s device."""
    return CHUNK_ELEMENTS if x.device.type == "cpu" else DEVICE_CHUNK_ELEMENTS


def _cast_eager(x: torch.Tensor, fmt: Format, rounding: str | None = None, generator=None, seed=None) -> torch.Tensor:
    """The eager cast. Large tensors whose scales are per row (block, channel, none) run in chunks of
    :func:`chunk_elements`: the same per-row arithmetic, so the same bits, without streaming ~20 full-size
    temporaries through memory (about 4x faster on a 64 MiB tensor here). Per-tensor and two-level
    scales (which need the whole tensor's amax) and stochastic rounding (one noise draw) run whole."""
    check_input(x)
    sc = fmt.scaling
    mode = rounding or fmt.rounding
    chunk = chunk_elements(x)
    if x.numel() <= 2 * chunk or sc.granularity == "tensor" or sc.tensor_scale or mode == "stochastic":
        return cast_unchunked(x, fmt, rounding, generator, seed)
    if not sc.scaled:  # element-wise: any slicing will do
        flat = x.reshape(-1)
        out = torch.empty_like(flat)
        advise_huge_pages(out)  # written once, in order: one fault per 2 MiB instead of per 4 KiB
        for i in range(0, flat.numel(), chunk):
            out[i : i + chunk] = cast_unchunked(flat[i : i + chunk], fmt, rounding)
        return out.reshape(x.shape)
    layout = Layout.of(x.shape, sc)
    rows = layout.to_rows(x)
    # the rows are already laid out: blocks run along their last axis, channels are their first
    row_fmt = fmt.with_(scaling=replace(sc, axis=-1 if sc.granularity == "block" else 0))
    out = torch.empty_like(rows)
    advise_huge_pages(out)
    step = max(1, chunk // rows.shape[1])
    for i in range(0, rows.shape[0], step):
        out[i : i + step] = cast_unchunked(rows[i : i + step], row_fmt, rounding)
    return layout.from_rows(out).reshape(x.shape)


def _warn_if_scales_saturate(x: torch.Tensor, fmt: Format) -> None:
    """A scale stored in a narrow format (FP16 group scales: at most 65504) cannot represent amax/max_elem for
    very large inputs: those blocks saturate below their amax (int4_g128 turns 1e6 into 458528). Warn with the
    count of such blocks; the values stay what the format gives (numcast never changes a format silently)."""
    sc, el = fmt.scaling, fmt.element
    if not sc.scaled or sc.rule != "amax" or sc.tensor_scale or x.numel() == 0:
        return
    limit = el.max * sc.scale_format.max  # the largest amax whose scale the scale format holds
    if limit >= torch.finfo(x.dtype).max:
        return
    lo, hi = torch.aminmax(x)  # one reduction, no temporary; NaN/inf take the careful path below
    amax = max(-float(lo), float(hi))
    if math.isfinite(amax) and amax <= limit:
        return
    finite = torch.where(torch.isfinite(x), x.abs(), torch.zeros((), dtype=x.dtype, device=x.device))
    if float(finite.max()) <= limit:
        return
    rows = Layout.of(x.shape, sc).to_rows(finite)
    n = int((rows.amax(dim=-1).double() > limit).sum())
    warnings.warn(
        f"{fmt.label}: {n} of {rows.shape[0]} scale blocks hold values beyond {limit:.6g} (= {el.max:g} x the "
        f"largest {fmt.scale_format_name} scale {sc.scale_format.max:g}); their scale saturates and those values are "
        "clipped. Use a format with a wider scale (e.g. an FP32 per-channel scale) for such tensors.",
        stacklevel=3,
    )


def cast(
    x: torch.Tensor,
    fmt: FormatLike,
    *,
    rounding: str | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    backend: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fake-quantize ``x`` to ``fmt``: same shape and dtype, every value on the format's grid.

    ``rounding`` overrides the format's default (``nearest_even``); ``stochastic`` needs ``generator`` or
    ``seed`` and never touches the global RNG. Results are exact (bit-identical to the spec's real-number
    definition) when the output dtype can hold the grid; a narrower input dtype (bfloat16/float16) gets
    the values rounded to it on return.

    ``backend`` picks how, never what: every backend gives the same bits.

    - ``"auto"`` (default): the compiled path for tensors of at least :data:`AUTO_MIN_ELEMENTS` elements
      when inductor can build kernels here (a C++ compiler on CPU, Triton on CUDA; looked up once), else
      eager. Also eager: stochastic rounding, an input that needs a gradient (``requires_grad`` under grad
      mode), a call made while ``torch.compile`` traces (the caller's compile fuses it), and any format the
      compiled path fails to compile (a ``RuntimeWarning`` says so once). The first compiled call of each
      format, rounding, dtype and device is also cast eagerly and compared bit for bit (once: one eager cast
      more); should they differ (a compiler fault), that kernel is dropped for eager with a ``RuntimeWarning``.
    - ``"eager"``: PyTorch ops, large tensors in row chunks.
    - ``"compiled"``: the same arithmetic fused by ``torch.compile`` (:mod:`numcast.formats.fused`), one
      shape-dynamic kernel per format, rounding, dtype and device (the first call compiles: seconds);
      errors propagate; stochastic rounding runs eager.

    ``out``: a tensor of x's shape, dtype and device to write the result into (``ValueError`` naming the
    mismatch otherwise); it is returned. ``out`` may be ``x`` itself.
    """
    fmt = get_format(fmt)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; one of {BACKENDS}")
    check_input(x)
    if out is not None:
        _check_out(out, x)
    mode = rounding or fmt.rounding
    _warn_if_scales_saturate(x, fmt)
    if mode != "stochastic" and (backend == "compiled" or (backend == "auto" and _auto_compiles(x, mode))):
        if backend == "compiled":
            return compiled_cast(x, fmt, mode, fresh_output(x, fmt) if out is None else out)
        res = _cast_auto(x, fmt, mode, out)
    else:
        res = _cast_eager(x, fmt, rounding, generator, seed)
    return res if out is None or res is out else out.copy_(res)


def _check_out(out: torch.Tensor, x: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    for what, want, got in (("shape", tuple(x.shape), tuple(out.shape)), ("dtype", x.dtype, out.dtype),
                            ("device", x.device, out.device)):  # fmt: skip
        if want != got:
            raise ValueError(f"out must match the result (x's shape, dtype and device): its {what} is {got}, "
                             f"the result's {want}")  # fmt: skip


def _auto_compiles(x: torch.Tensor, mode: str) -> bool:
    """Whether ``backend="auto"`` takes the compiled path for ``x`` (see :func:`cast`; the format's own fallback
    is decided in :func:`_cast_auto`)."""
    if x.numel() < AUTO_MIN_ELEMENTS or (x.requires_grad and torch.is_grad_enabled()):
        return False
    return not torch.compiler.is_compiling() and compiler_available(x.device.type)


def _cast_auto(x: torch.Tensor, fmt: Format, mode: str, out: torch.Tensor | None) -> torch.Tensor:
    """The compiled cast where this kernel works (``_AUTO_EAGER``), checked against the eager cast on its first
    call; the eager cast otherwise."""
    key = kernel_key(x, fmt, mode)
    if key in _AUTO_EAGER:
        return _cast_eager(x, fmt, mode)
    dest = fresh_output(x, fmt) if out is None else out
    into = writes_into(x, fmt, dest)  # an in-place cast (out is x) is checked before x is overwritten
    try:
        res = compiled_cast(x, fmt, mode, dest if into else None)
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever stops the compiler, the eager path decides
        ref = _cast_eager(x, fmt, mode)  # an error of the call itself (not of the compiler) raises here
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        _auto_drop(key, fmt, f"torch.compile failed ({reason[:300]})")
        return ref
    if (key, into) not in _AUTO_CHECKED:
        ref = _cast_eager(x, fmt, mode)
        if not _same_bits(res, ref):
            _auto_drop(key, fmt, "the compiled kernel's result differs from the eager cast's")
            return ref
        _AUTO_CHECKED.add((key, into))
    return res


def _auto_drop(key: KernelKey, fmt: Format, reason: str) -> None:
    _AUTO_EAGER[key] = reason
    warnings.warn(
        f"numcast.cast({fmt.label}, rounding={key[1]}, {key[2]}, {key[3]}): {reason}; backend='auto' casts it "
        "eagerly from now on (same bits, slower). Pass backend='eager' to skip the attempt.",
        RuntimeWarning,
        stacklevel=4,
    )


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, every NaN equal to every NaN (payloads aside), +0 != −0."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    ints = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
            torch.bfloat16: torch.int16}  # fmt: skip
    ai, bi = a.contiguous().view(ints[a.dtype]), b.contiguous().view(ints[b.dtype])
    if torch.equal(ai, bi):
        return True
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and torch.equal(ai.masked_fill(nan, 0), bi.masked_fill(nan, 0))


def quantize(
    x: torch.Tensor,
    fmt: FormatLike,
    *,
    rounding: str | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    out: torch.Tensor | None = None,
) -> QTensor:
    """Quantize ``x`` to a :class:`~numcast.formats.qtensor.QTensor` (codes + scales + format). Large tensors whose
    scales allow it are quantized in slices along their first axis (the same bits, a fraction of the memory).

    ``out``: a tensor of x's shape, dtype and device that also receives the dequantized values, bit for bit
    ``quantize(x).dequantize()`` (= ``cast(x)``), from the cast itself rather than by decoding the codes again:
    for callers that keep both (a quantized layer's cached float weight)."""
    fmt = get_format(fmt)
    check_input(x)
    if out is not None:
        _check_out(out, x)
    _warn_if_scales_saturate(x, fmt)
    step = _independent_slices(x, fmt, rounding or fmt.rounding)
    if step is None:
        r = grid_cast(x, fmt, rounding, generator, seed)
        if out is not None:
            out.copy_(r.output(x.shape, x.dtype))
        return QTensor.from_grid_cast(r, fmt, tuple(x.shape), x.dtype)
    t = tensor_scale_of(x, fmt)  # two-level formats: the whole tensor's, so every slice is scaled as the whole
    parts = []
    for i in range(0, x.shape[0], step):
        piece = x[i : i + step]
        r = grid_cast(piece, fmt, rounding, tensor_scale=t)
        if out is not None:
            out[i : i + step] = r.output(piece.shape, x.dtype)
        parts.append(QTensor.from_grid_cast(r, fmt, tuple(piece.shape), x.dtype))
    return QTensor.concat(parts)


def _independent_slices(x: torch.Tensor, fmt: Format, mode: str) -> int | None:
    """Slices of about :func:`chunk_elements` along ``x``'s first axis (their length) when they quantize independently
    of each other and ``x`` is large: scales per block along another axis (a two-level format's tensor scale
    fixed from the whole tensor), per channel of the first axis, or none, and no stochastic noise (one draw for
    the whole tensor); else None. Quantized whole, the engine's element-wise chain holds a dozen or more
    full-size temporaries at once, which set the peak of a weight-only RTN run (``benchmarks/memory.py``)."""
    sc, nd, chunk = fmt.scaling, x.dim(), chunk_elements(x)
    if nd < 2 or x.numel() <= 2 * chunk or mode == "stochastic":
        return None
    along_first = sc.axis % nd == 0
    if not {"none": True, "block": not along_first, "channel": along_first}.get(sc.granularity, False):
        return None
    return max(1, chunk // x[0].numel())


class _STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fmt, rounding, generator, seed, mask_outside):  # noqa: D102
        r = grid_cast(x.detach(), fmt, rounding, generator, seed)
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


def _sqnr_db(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    if noise == math.inf or signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


def cast_stats(x: torch.Tensor, fmt: FormatLike, **kw) -> tuple[torch.Tensor, dict]:
    """``cast`` plus error figures: MSE, SQNR (dB), max abs error, fractions saturated and flushed to zero,
    NaN/inf counts of input and output, and ``finite_to_nonfinite``: finite inputs whose output is NaN/inf (the
    rest of a block holding a NaN, an overflow without saturation). Those make the error unbounded: MSE and max
    error are inf, SQNR −inf. Positions whose input is already non-finite are excluded from the error figures."""
    fmt = get_format(fmt)
    check_input(x)
    _warn_if_scales_saturate(x, fmt)
    r = grid_cast(x, fmt, kw.get("rounding"), kw.get("generator"), kw.get("seed"))
    out = r.output(x.shape, x.dtype)
    sat = r.rows_to_tensor(saturated_rows(r, fmt), x.shape)
    xd, od = x.double(), out.double()
    fin = torch.isfinite(xd) & torch.isfinite(od)
    err = (od - xd)[fin]
    sig = xd[fin]
    lost = int((torch.isfinite(xd) & ~torch.isfinite(od)).sum())
    mse = math.inf if lost else (float(err.square().mean()) if err.numel() else 0.0)
    p_sig = float(sig.square().mean()) if sig.numel() else 0.0
    n = max(x.numel(), 1)
    stats = {
        "format": fmt.label,
        "numel": x.numel(),
        "mse": mse,
        "sqnr_db": _sqnr_db(p_sig, mse),
        "max_abs_err": math.inf if lost else (float(err.abs().max()) if err.numel() else 0.0),
        "finite_to_nonfinite": lost,
        "frac_saturated": float(sat.sum()) / n,
        "frac_flushed_to_zero": float(((xd != 0) & torch.isfinite(xd) & (od == 0)).sum()) / n,
        "nan_in": int(torch.isnan(xd).sum()),
        "inf_in": int(torch.isinf(xd).sum()),
        "nan_out": int(torch.isnan(od).sum()),
        "inf_out": int(torch.isinf(od).sum()),
    }
    return out, stats
