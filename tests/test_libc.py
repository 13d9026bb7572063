"""The C-library calls of :mod:`numcast.libc`, checked against what the kernel reports (``/proc/self/smaps``)."""

from __future__ import annotations

import sys

import torch
from helpers import thp_available, vm_flags

from numcast.libc import HUGE_PAGE, advise_huge_pages, glibc


def test_glibc_lookup():
    assert glibc("no_such_function_in_any_libc") is None
    if sys.platform.startswith("linux"):
        assert glibc("madvise") is not None


@thp_available
def test_a_large_fresh_tensor_is_advised_to_huge_pages():
    # 64 MiB: above glibc's largest dynamic mmap threshold (32 MiB on 64-bit), so a fresh mapping of its own and
    # never heap memory that an earlier test's advice already marked
    t = torch.empty(32 * HUGE_PAGE // 4)
    assert "hg" not in vm_flags(t.data_ptr() + HUGE_PAGE)
    assert advise_huge_pages(t)
    assert "hg" in vm_flags(t.data_ptr() + 2 * HUGE_PAGE)  # the kernel took the advice (its 2 MiB-aligned part)
    t.fill_(3.0)
    assert bool((t == 3.0).all())


def test_small_and_non_cpu_tensors_are_left_alone():
    assert not advise_huge_pages(torch.empty(1000))  # under two huge pages
    assert not advise_huge_pages(torch.empty(8 * HUGE_PAGE, device="meta"))
