"""The C-library calls of :mod:`numcast.libc`, checked against what the kernel reports (``/proc/self/smaps``)."""

from __future__ import annotations

import ctypes
import sys

import pytest
import torch
from helpers import resident_bytes, rss_kb, smaps_entry, sync_file, thp_available, vm_flags
from safetensors import safe_open
from safetensors.torch import save_file

from numcast.libc import HUGE_PAGE, advise_huge_pages, glibc, page_out_file_pages

MADV_NOHUGEPAGE = 15  # <sys/mman.h> on Linux

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc/self/smaps: Linux")


def test_glibc_lookup():
    assert glibc("no_such_function_in_any_libc") is None
    if sys.platform.startswith("linux"):
        assert glibc("madvise") is not None


@thp_available
def test_a_large_fresh_tensor_is_advised_to_huge_pages():
    t = torch.empty(32 * HUGE_PAGE // 4)  # 64 MiB
    # Where the allocator placed it (a fresh mapping, or memory an earlier advice already marked: CI saw "hg"
    # there before any advice) is not this test's business: take the advice away first, so that the flag below
    # can only come from advise_huge_pages
    aligned = -(-t.data_ptr() // HUGE_PAGE) * HUGE_PAGE
    assert glibc("madvise")(ctypes.c_void_p(aligned), ctypes.c_size_t(8 * HUGE_PAGE), MADV_NOHUGEPAGE) == 0
    assert "hg" not in vm_flags(aligned + HUGE_PAGE)
    assert advise_huge_pages(t)
    assert "hg" in vm_flags(aligned + HUGE_PAGE)  # the kernel took the advice (its 2 MiB-aligned part)
    t.fill_(3.0)
    assert bool((t == 3.0).all())


def test_small_and_non_cpu_tensors_are_left_alone():
    assert not advise_huge_pages(torch.empty(1000))  # under two huge pages
    assert not advise_huge_pages(torch.empty(8 * HUGE_PAGE, device="meta"))


def _file_tensor(path, n: int) -> torch.Tensor:
    """``n`` float32 values read from a safetensors file (safetensors maps it privately; transformers loads
    checkpoints so), every page touched."""
    save_file({"w": torch.arange(n, dtype=torch.float32)}, path)
    sync_file(path)
    with safe_open(path, framework="pt") as f:
        t = f.get_tensor("w")
    assert torch.equal(t, torch.arange(n, dtype=torch.float32))  # reads every page: resident now
    return t


@linux_only
def test_page_out_gives_back_a_file_mapping_and_keeps_its_values(tmp_path):
    n = 4 << 20  # 16 MiB
    t = _file_tensor(tmp_path / "w.safetensors", n)
    before = rss_kb(t.data_ptr())
    assert smaps_entry(t.data_ptr())["path"].endswith("w.safetensors") and before >= 15 * 1024
    t[5] = -1.0  # a page the process wrote to (copy-on-write: now anonymous memory of this process)
    advised = page_out_file_pages(t)
    assert advised >= 4 * n - 2 * 4096  # the whole pages inside the tensor's bytes
    after = rss_kb(t.data_ptr())
    assert after <= 64, (before, after)  # the clean pages left; at most the written one stays
    expected = torch.arange(n, dtype=torch.float32)
    expected[5] = -1.0
    assert torch.equal(t, expected)  # read back from the file, the written page kept


@linux_only
def test_page_out_leaves_anonymous_memory_and_partial_pages_alone():
    t = torch.ones(4 << 20)
    assert page_out_file_pages(t) == 0  # not a file mapping: never paged out
    # the tensor's own pages, not its mapping's Rss: glibc may place it in heap memory whose mapping an earlier
    # madvise split (CI saw 9.4 MiB in the mapping that holds its first byte)
    assert resident_bytes(t) >= 16 << 20
    assert page_out_file_pages(torch.ones(100)) == 0
    assert page_out_file_pages(torch.empty(4 << 20, device="meta")) == 0
