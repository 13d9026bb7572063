"""The few C-library calls numcast makes about memory (ctypes), each a no-op answering False where the C library
does not have it (not Linux/glibc): allocator settings and trimming for the pipeline, huge-page advice for large
fresh outputs of the cast.

Import-free of the rest of numcast: a lowest layer, usable by every other.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

import torch

HUGE_PAGE = 1 << 21  # bytes: x86-64's and most arm64 kernels' transparent huge page
MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux


@functools.cache
def glibc(function: str):
    """A function of the C library (ctypes), or None where it has none by that name."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), function)
    except (OSError, AttributeError):
        return None


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Ask Linux to back the untouched memory of ``t`` (a CPU tensor) with transparent huge pages
    (``madvise(MADV_HUGEPAGE)`` on the 2 MiB-aligned part of its storage; kernel doc
    ``admin-guide/mm/transhuge``), so that the first write faults in one 2 MiB page at a time instead of 512
    pages of 4 KiB (MXFP4 cast of a fresh 64 MiB output: ``benchmarks/formats.py``, README speed table). Values are
    unchanged; the memory is returned to the system as before when the tensor is freed. True when the kernel took
    the advice; False on other systems, for tensors under two huge pages, or when the kernel refused (THP
    ``never``)."""
    if not sys.platform.startswith("linux") or t.device.type != "cpu":
        return False
    madvise = _madvise()
    storage = t.untyped_storage()
    start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    first, last = -(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE
    if madvise is None or last - first < 2 * HUGE_PAGE:
        return False
    return madvise(first, last - first, MADV_HUGEPAGE) == 0


@functools.cache
def _madvise():
    """``madvise`` with its argument types declared (addresses above 2^31 need ``c_void_p``), or None."""
    madvise = glibc("madvise")
    if madvise is not None:
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise
