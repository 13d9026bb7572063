"""The few C-library calls numcast makes about memory (ctypes), each a no-op answering False where the C library
does not have it (not Linux/glibc): allocator settings and trimming for the pipeline, huge-page advice for large
fresh outputs of the cast, and giving back the pages of a memory-mapped checkpoint the pipeline is done with.

Import-free of the rest of numcast: a lowest layer, usable by every other.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

import torch

HUGE_PAGE = 1 << 21  # bytes: x86-64's and most arm64 kernels' transparent huge page
MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux
MADV_PAGEOUT = 21  # <sys/mman.h> on Linux >= 5.4


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


def page_out_file_pages(t: torch.Tensor) -> int:
    """Let Linux reclaim the resident pages of ``t``'s bytes where they lie in a file mapping (a checkpoint that
    safetensors / transformers memory-mapped): ``madvise(MADV_PAGEOUT)`` on the whole pages inside the tensor's
    bytes (``madvise(2)``). Contents are preserved: a clean file page is read again from the file if touched, and
    a page the process wrote to stays (or goes to swap), so this is safe even while something still reads the
    tensor; it only stops counting pages the caller is done with in the process's resident memory (pages of a
    file still being written back to disk stay until they are clean). Anonymous memory (an ordinary tensor) and
    strided views are left alone. Returns the bytes advised: 0 on other systems, for non-CPU tensors, outside
    file mappings, or when the kernel refused (before Linux 5.4)."""
    if not sys.platform.startswith("linux") or t.device.type != "cpu" or not t.is_contiguous():
        return 0
    madvise = _madvise()
    page = _page_size()
    start = t.data_ptr()
    first, last = -(-start // page) * page, (start + t.numel() * t.element_size()) // page * page
    if madvise is None or last <= first or not _in_file_mapping(first, last):
        return 0
    return last - first if madvise(first, last - first, MADV_PAGEOUT) == 0 else 0


def page_out_module(module: torch.nn.Module) -> int:
    """:func:`page_out_file_pages` on every parameter and buffer of ``module`` (a layer the caller is done with,
    or has just read through once); the bytes advised."""
    return sum(page_out_file_pages(t.detach()) for t in [*module.parameters(), *module.buffers()])


def _in_file_mapping(start: int, end: int) -> bool:
    """Whether [start, end) lies inside one file-backed mapping of this process (``/proc/self/maps``: a mapping
    with a path, not a pseudo-entry such as ``[heap]`` nor anonymous memory)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                lo, hi = (int(a, 16) for a in fields[0].split("-"))
                if lo <= start and end <= hi:
                    path = fields[5].strip() if len(fields) == 6 else ""
                    return path.startswith("/")
    except OSError:
        pass
    return False


@functools.cache
def _page_size() -> int:
    return os.sysconf("SC_PAGE_SIZE")


@functools.cache
def _madvise():
    """``madvise`` with its argument types declared (addresses above 2^31 need ``c_void_p``), or None."""
    madvise = glibc("madvise")
    if madvise is not None:
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise
