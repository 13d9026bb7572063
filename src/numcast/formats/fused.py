"""The compiled cast: the very same engine as the eager path, fused by ``torch.compile``.

Inductor turns the chain of element-wise ops (and the per-block amax) into one loop nest per format
(C++/OpenMP on CPU, Triton on GPU), so a cast reads its input about once instead of ~20 times. The
arithmetic is the eager code's, op for op (:func:`~numcast.formats.engine.cast_unchunked`);
``tests/formats/test_fused.py`` and ``tests/formats/test_auto_backend.py`` check the paths bit-identical.
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

from numcast.formats.engine import cast_unchunked, tensor_scale_of
from numcast.formats.layout import Layout
from numcast.formats.spec import Format
from numcast.libc import advise_huge_pages

KernelKey = tuple[Format, str, torch.dtype, str]
_SERIAL = itertools.count()
# OpenMP in every CPU kernel, whatever the first call's size: inductor otherwise decides from the size hint of the
# call that compiled the kernel (and its on-disk cache keeps that decision), so a kernel first compiled on a small
# tensor stayed single-threaded for every later large one (README speed notes: NVFP4 7.3x -> 4.2x the copy)
INDUCTOR_OPTIONS = {"cpp.dynamic_threads": True}


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

            return bool(has_triton())
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


@functools.lru_cache(maxsize=512)
def _kernel(key: KernelKey, into: bool) -> Callable:
    """The compiled rows cast of ``key`` (returning the rows, or writing them ``into`` a second argument)."""
    row_fmt, rounding, _dtype, _device = key  # dtype and device: only kernels of their own (a code object each)

    def cast_rows(rows: torch.Tensor, tensor_scale: torch.Tensor | None = None) -> torch.Tensor:
        return cast_unchunked(rows, row_fmt, rounding, tensor_scale=tensor_scale)

    def cast_rows_into(rows: torch.Tensor, out: torch.Tensor, tensor_scale: torch.Tensor | None = None) -> None:
        # inductor stores the fused result straight into out
        out.copy_(cast_unchunked(rows, row_fmt, rounding, tensor_scale=tensor_scale))

    fn = _own_code(cast_rows_into if into else cast_rows, str(next(_SERIAL)))
    return torch.compile(fn, fullgraph=True, options=INDUCTOR_OPTIONS)


def _mark_dynamic(rows: torch.Tensor, layout: Layout) -> torch.Tensor:
    rows = rows.view(rows.shape)  # a fresh tensor object: the caller's tensor is never marked
    torch._dynamo.maybe_mark_dynamic(rows, 0)
    if layout.granularity != "block":
        torch._dynamo.maybe_mark_dynamic(rows, 1)
    return rows


def fresh_output(x: torch.Tensor, fmt: Format) -> torch.Tensor | None:
    """A new tensor for the compiled cast of ``x`` (on the CPU) to write its result straight into, or None where the
    kernel could not (the rows layout needs a copy) or ``x`` is not on the CPU. Its memory is advised to huge pages
    (:func:`numcast.libc.advise_huge_pages`): the kernel's first write into a fresh 64 MiB output would otherwise
    fault in 16,384 pages of 4 KiB, which took longer than the cast itself (``benchmarks/formats.py``, allocator
    env off)."""
    if x.device.type != "cpu":
        return None
    out = torch.empty(x.shape, dtype=x.dtype)
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
    # a two-level format's tensor scale comes in computed (a whole-tensor reduction inside the kernel made inductor
    # emit it without OpenMP: one thread for the whole cast)
    t = tensor_scale_of(x, fmt)
    if writes_into(x, fmt, out):
        _kernel(kernel_key(x, fmt, rounding), True)(rows, _mark_dynamic(_rows_view(layout, out), layout), t)
        return out
    res = layout.from_rows(_kernel(kernel_key(x, fmt, rounding), False)(rows, t)).reshape(x.shape)
    return res if out is None else out.copy_(res)


def shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors live in one storage (so a write to one may change the other)."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
