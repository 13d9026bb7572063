"""The compiled cast: the very same engine as the eager path, fused by ``torch.compile``.

Inductor turns the chain of element-wise ops into one loop nest per format (C++/OpenMP on CPU, Triton on GPU), so a
cast reads its input once or twice instead of ~20 times: formats with a scale per block or channel compute their
scales in a kernel of their own first (one vectorised pass over the input, :func:`scales_apart`), then the element
kernel reads the input and the scales. The arithmetic is the eager code's, op for op
(:func:`~numcast.formats.engine.grid_cast` with those scales is what :func:`~numcast.formats.engine.cast_unchunked`
computes); ``tests/formats/test_fused.py`` and ``tests/formats/test_auto_backend.py`` check the paths bit-identical.
Stochastic rounding stays eager (its noise comes from an explicit ``torch.Generator``).

What is compiled is the cast of the *rows* (``[R, L]``, one scale per row, :class:`~numcast.formats.layout.Layout`),
not of the tensor: the tensor is viewed as rows outside the compiled code (a free view when blocks run along the
last axis and need no padding, channels along the first, or the scale is per tensor; else one copy), so one kernel
serves every tensor shape. The row count is marked dynamic (``torch._dynamo.maybe_mark_dynamic``), and so is the
row length unless it is a block size: a new shape does not recompile. (Marking the tensor's own dims dynamic
instead, or ``dynamic=True``, made inductor emit an extra unvectorised index-arithmetic copy after the cast: ~2.5x
slower here; ``dynamic=True`` also turns the format's integer constants symbolic, which ``math.ldexp`` refuses.)

Each kernel is cached per (rows format, rounding, dtype, device type, writes into ``out`` or not) and gets a code object
of its own: dynamo keeps its compiled graphs, and its recompile limit (8), per code object, so kernels for many
formats never evict or disable one another. The first call of each kernel pays the compile (about 1–20 s on 2 CPU
cores; inductor's on-disk cache makes it ~1 s in a later process).
"""

from __future__ import annotations

import functools
import itertools
import math
import types
from collections.abc import Callable
from dataclasses import replace

import torch

from numcast.formats.element import work_dtype
from numcast.formats.engine import cast_unchunked, grid_cast
from numcast.formats.layout import Layout
from numcast.formats.scale import Scales, compute_scales
from numcast.formats.spec import Format
from numcast.libc import advise_huge_pages

KernelKey = tuple[Format, str, torch.dtype, str]
_SERIAL = itertools.count()
# OpenMP in every CPU kernel, whatever the first call's size: inductor otherwise decides from the size hint of the
# call that compiled the kernel (and its on-disk cache keeps that decision), so a kernel first compiled on a small
# tensor stayed single-threaded for every later large one (README speed notes: NVFP4 7.3x -> 4.2x the copy)
INDUCTOR_OPTIONS = {"cpp.dynamic_threads": True}
# On CUDA, Triton lowers a float32 x / y to the approximate div.full.f32 and links libdevice with flush-to-zero
# (subnormal inputs and results read as 0): on an H200 both changed the bits of int4_g128, int8_channel and the
# directed roundings of int4, fp8_e4m3 and nvfp4 (tests/formats/test_cuda.py, scripts/device_check.sh). Inductor's
# eager_numerics switches compile IEEE division (div_rn) without flush-to-zero, as the eager CUDA ops compute; an
# inductor without them gets no compiled CUDA path (:func:`exact_on_cuda`).
CUDA_EXACT_OPTIONS = {"eager_numerics.division_rounding": True, "eager_numerics.disable_ftz": True}


def exact_on_cuda() -> bool:
    """Whether this torch's inductor has the switches that make its Triton kernels compute as the eager CUDA ops
    do (:data:`CUDA_EXACT_OPTIONS`)."""
    import torch._inductor.config as inductor_config

    numerics = getattr(inductor_config, "eager_numerics", None)
    return all(hasattr(numerics, key.split(".")[1]) for key in CUDA_EXACT_OPTIONS)


def inductor_options(device_type: str) -> dict:
    """The options numcast's kernels for ``device_type`` are compiled with; ``RuntimeError`` on CUDA where
    :func:`exact_on_cuda` is False (its kernels would not give the eager cast's bits)."""
    if device_type != "cuda":
        return INDUCTOR_OPTIONS
    if not exact_on_cuda():
        raise RuntimeError(
            f"torch {torch.__version__}: inductor lacks {sorted(CUDA_EXACT_OPTIONS)}, without which "
            "its CUDA kernels divide approximately and flush subnormals to zero; use backend='eager'"
        )
    return {**INDUCTOR_OPTIONS, **CUDA_EXACT_OPTIONS}


@functools.cache
def compiler_available(device_type: str) -> bool:
    """Whether inductor can build kernels for ``device_type`` in this process: the C++ compiler it would use on
    CPU (``torch._inductor.cpp_builder.get_cpp_compiler``: ``$CXX`` or g++, one ``--version`` call), Triton on
    CUDA; False for other devices. Cached: asked once per process and device type."""
    try:
        if device_type == "cpu":
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
            return True
        if device_type == "cuda":
            from torch.utils._triton import has_triton

            return bool(has_triton()) and exact_on_cuda()
    except Exception:  # noqa: BLE001 - any failure to find a toolchain means: no compiled path here
        return False
    return False


def rows_format(fmt: Format) -> Format:
    """``fmt`` as it applies to the rows layout: blocks along the rows' last axis, channels along their first."""
    sc = fmt.scaling
    if sc.granularity == "block" and sc.axis != -1:
        return fmt.with_(scaling=replace(sc, axis=-1))
    if sc.granularity == "channel" and sc.axis != 0:
        return fmt.with_(scaling=replace(sc, axis=0))
    return fmt


def kernel_key(x: torch.Tensor, fmt: Format, rounding: str) -> KernelKey:
    """What the kernels that cast ``x`` to ``fmt`` are specialised on: (rows format, rounding, dtype, device type)."""
    return rows_format(fmt), rounding, x.dtype, x.device.type


def _rows_view(layout: Layout, t: torch.Tensor) -> torch.Tensor | None:
    """``t`` as the layout's rows without a copy (a view sharing its memory), or None where the rows need one."""
    n_rows, width = _rows_shape(layout)
    plain = (
        layout.granularity in ("none", "tensor")
        or (layout.granularity == "channel" and layout.axis == 0)
        or (layout.granularity == "block" and layout.axis == len(layout.shape) - 1 and not layout.padded)
    )
    if not plain:
        return None
    try:
        return t.view(n_rows, width)
    except RuntimeError:  # strides that do not merge (a transposed or sliced tensor)
        return None


def _rows_shape(layout: Layout) -> tuple[int, int]:
    """(rows, row length) of the layout's rows, as ``Layout.to_rows`` makes them."""
    if layout.granularity == "block":
        return math.prod(layout.moved_shape[:-1]) * layout.n_blocks, layout.block
    if layout.granularity == "channel":
        return layout.moved_shape[0], math.prod(layout.moved_shape[1:])
    return 1, math.prod(layout.shape)


def _own_code(fn: Callable, tag: str) -> Callable:
    """``fn`` with a code object of its own (same body, closure and globals), so dynamo caches it apart."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def scales_apart(fmt: Format) -> bool:
    """Whether the compiled cast of ``fmt`` computes its scales in a kernel of their own (:func:`_scales_kernel`)
    before the element kernel: formats with a scale per block or channel. Fused into the element loop, inductor
    recomputes a row's scalar scale arithmetic for every vector of 8 values of the row (it hoists no loop
    invariants, and the C++ compiler cannot hoist a load that may alias the stores); where that arithmetic is long
    (int4_g128's FP16 scale: a float64 division and the FP16 rounding; NVFP4's two levels) computing every scale once
    in a vectorised pass is faster, although it reads the input once more; MX formats run at the same speed either
    way (scratch timings of both layouts; the README's speed table has this layout's)."""
    return fmt.scaling.scaled and fmt.scaling.granularity in ("block", "channel")


@functools.lru_cache(maxsize=512)
def _scales_kernel(key: KernelKey) -> Callable:
    """The compiled scales of the rows of ``key``'s format: ``compute_scales`` of the rows in the work dtype, as
    the tuple (scale, tensor scale, zero points, sub-block offsets, reciprocal, sub-block positions) that
    :func:`_kernel` takes (None where absent).
    A two-level format's per-tensor scale is reduced here from the blocks' amax, as the eager cast does: one read
    of the input for both levels (a separate ``torch.aminmax`` pass before this kernel cost NVFP4 a read more)."""
    row_fmt = key[0]
    elem, scaling = row_fmt.element, row_fmt.scaling

    def scales_of_rows(rows: torch.Tensor) -> tuple:
        # the amax rules read only the rows' extremes, exact in the rows' own dtype: no float64 copy of the input
        # where the elements work in float64 (NVFP4, FP32-scaled formats)
        work_rows = rows.to(work_dtype(elem, scaling, rows.dtype)) if scaling.power_of_two else rows
        s = compute_scales(work_rows, elem, scaling, offsets_per_element=True)
        return s.scale, s.tensor_scale, s.zero_point, s.sub_offset, s.inverse, s.sub_position

    fn = _own_code(scales_of_rows, str(next(_SERIAL)))
    return torch.compile(fn, fullgraph=True, options=inductor_options(key[3]))


@functools.lru_cache(maxsize=512)
def _kernel(key: KernelKey, into: bool) -> Callable:
    """The compiled rows cast of ``key`` (returning the rows, or writing them ``into`` a second argument). For
    :func:`scales_apart` formats its last arguments are the scales from :func:`_scales_kernel`."""
    row_fmt, rounding, _dtype, _device = key  # dtype and device: only kernels of their own (a code object each)
    apart, sub_block = scales_apart(row_fmt), row_fmt.scaling.sub_block_size or 0

    def cast_of(rows: torch.Tensor, scales: tuple) -> torch.Tensor:
        if not apart:
            return cast_unchunked(rows, row_fmt, rounding)
        scale, tensor_scale, zero_point, sub_offset, inverse, sub_position = scales
        # compute_scales gives offsets (sub_offset or sub_position) exactly when sub_block > 0
        given = Scales(scale, tensor_scale, zero_point, sub_offset, sub_block, inverse, sub_position)
        return grid_cast(rows, row_fmt, rounding, scales=given, own_scales=True).output(rows.shape, rows.dtype)

    def cast_rows(rows: torch.Tensor, *scales: torch.Tensor | None) -> torch.Tensor:
        return cast_of(rows, scales)

    def cast_rows_into(rows: torch.Tensor, out: torch.Tensor, *scales: torch.Tensor | None) -> None:
        out.copy_(cast_of(rows, scales))  # inductor stores the fused result straight into out

    fn = _own_code(cast_rows_into if into else cast_rows, str(next(_SERIAL)))
    return torch.compile(fn, fullgraph=True, options=inductor_options(key[3]))


def _mark_dynamic(rows: torch.Tensor, layout: Layout) -> torch.Tensor:
    rows = rows.view(rows.shape)  # a fresh tensor object: the caller's tensor is never marked
    torch._dynamo.maybe_mark_dynamic(rows, 0)
    if layout.granularity != "block":
        torch._dynamo.maybe_mark_dynamic(rows, 1)
    return rows


def fresh_output(x: torch.Tensor, fmt: Format) -> torch.Tensor | None:
    """A new tensor for the compiled cast of ``x`` to write its result straight into, or None where the kernel could
    not (the rows layout needs a copy). On the CPU its memory is advised to huge pages
    (:func:`numcast.libc.advise_huge_pages`): the kernel's first write into a fresh 64 MiB output would otherwise
    fault in 16,384 pages of 4 KiB, which took longer than the cast itself (``benchmarks/formats.py``, allocator
    env off). On an H200 the kernel writing into a given tensor ran 1.03–1.7× faster than the one returning its own
    (``benchmarks/results/formats_cuda.json``: "compiled, out=" against "compiled")."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if _rows_view(Layout.of(x.shape, fmt.scaling), out) is None:
        return None
    advise_huge_pages(out)
    return out


def writes_into(x: torch.Tensor, fmt: Format, out: torch.Tensor | None) -> bool:
    """Whether :func:`compiled_cast` of ``x`` with ``out`` runs the kernel that writes straight into ``out`` (``out``
    viewed as rows without a copy, sharing no memory with ``x``); otherwise it casts and copies."""
    if out is None or shares_memory(out, x):
        return False
    return _rows_view(Layout.of(x.shape, fmt.scaling), out) is not None


def compiled_cast(x: torch.Tensor, fmt: Format, rounding: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """``cast_unchunked(x, fmt, rounding)`` by the compiled kernels, bit for bit (``rounding`` resolved, not
    ``stochastic``). With ``out`` (x's shape, dtype and device, checked by the caller) the result is written into
    it, directly by the kernel where :func:`writes_into` says so; returns it."""
    layout = Layout.of(x.shape, fmt.scaling)
    rows = _rows_view(layout, x)
    if rows is None:
        rows = layout.to_rows(x)
    rows = _mark_dynamic(rows, layout)
    key = kernel_key(x, fmt, rounding)
    # block and channel formats take their scales from the scales kernel (a two-level format's per-tensor scale too,
    # reduced there from the blocks' amax); the other formats have none
    scales = tuple(_mark_rows_dynamic(t) for t in _scales_kernel(key)(rows)) if scales_apart(fmt) else ()
    if writes_into(x, fmt, out):
        _kernel(key, True)(rows, _mark_dynamic(_rows_view(layout, out), layout), *scales)
        return out
    res = layout.from_rows(_kernel(key, False)(rows, *scales)).reshape(x.shape)
    return res if out is None else out.copy_(res)


def _mark_rows_dynamic(t: torch.Tensor | None) -> torch.Tensor | None:
    """A per-row scales tensor with its row count marked dynamic, as the rows' (0-dim and None pass through)."""
    if t is not None and t.dim():
        torch._dynamo.maybe_mark_dynamic(t, 0)
    return t


def shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors live in one storage (so a write to one may change the other)."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
