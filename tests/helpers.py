"""Shared test helpers (no numcast logic: references live in the test files)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch


def assert_bitwise(a: torch.Tensor, b: torch.Tensor, msg: str = "") -> None:
    """Equal bit for bit, treating every NaN as equal to every NaN (and +0 != −0)."""
    a = torch.as_tensor(a)
    b = torch.as_tensor(b)
    assert a.shape == b.shape, f"{msg}: shapes {tuple(a.shape)} != {tuple(b.shape)}"
    an, bn = torch.isnan(a), torch.isnan(b)
    assert torch.equal(an, bn), f"{msg}: NaN positions differ at {torch.nonzero(an != bn)[:5].tolist()}"
    ia = a.double().masked_fill(an, 0).numpy().view(np.int64)
    ib = b.double().masked_fill(bn, 0).numpy().view(np.int64)
    bad = np.nonzero(ia != ib)
    if bad[0].size:
        i = tuple(int(k[0]) for k in bad)
        raise AssertionError(
            f"{msg}: {bad[0].size} of {a.numel()} values differ, first at {i}: {a[i].item()!r} != {b[i].item()!r}"
        )


def adversarial_f32(grid: np.ndarray, fmax: float) -> np.ndarray:
    """Float32 values that stress a cast onto ``grid`` (sorted finite representable values).

    Every grid value, every midpoint (ties at every binade), the float32 neighbours of each midpoint and
    grid value, ±max, just above max, max + half ulp, ±inf, NaN, ±0, float32 subnormals and huge values.
    """
    g = np.unique(grid.astype(np.float64))
    mids = (g[:-1] + g[1:]) / 2
    base = np.concatenate([g, mids, [fmax * 1.0001, fmax * 2, 3e38, 1e-40, 1e-45, 1.2e-38, 0.0, -0.0]])
    with np.errstate(over="ignore"):  # values beyond float32 become inf, itself a test value
        base = np.concatenate([base, -base]).astype(np.float32)
    up = np.nextafter(base, np.float32(np.inf))
    down = np.nextafter(base, np.float32(-np.inf))
    special = np.array([np.inf, -np.inf, np.nan], dtype=np.float32)
    return np.concatenate([base, up, down, special]).astype(np.float32)


def adversarial_blocks(block: int, rng: np.random.Generator) -> np.ndarray:
    rows = []
    rows.append(np.zeros(block))
    for p in (-130, -126, -100, -20, -1, 0, 1, 8, 20, 100, 126, 127):
        at = rng.standard_normal(block) * 2.0**p / 4
        at[rng.integers(block)] = 2.0**p  # block max exactly a power of two
        rows.append(at)
        below = at.copy()
        below[np.argmax(np.abs(below))] = np.nextafter(np.float32(2.0**p), np.float32(0))
        rows.append(below)
    rows.append(rng.standard_normal(block) * 1e-40)
    rows.append(rng.standard_normal(block) * 1e38)
    r = rng.standard_normal(block)
    r[3] = np.nan
    rows.append(r)
    r = rng.standard_normal(block)
    r[5] = np.inf
    rows.append(r)
    r = rng.standard_normal(block)
    r[0] = -np.inf
    rows.append(r)
    spread = rng.standard_normal(block) * np.exp(rng.uniform(-30, 30, block))
    rows.append(spread)
    rows.append(np.full(block, 957.0))  # pitfall 9: saturates to 896 in MXFP8 E4M3
    return np.array(rows, dtype=np.float32)


STANDARD_PHOTOS = ("camera", "chelsea", "coffee", "motorcycle")  # shipped photos with a clear ImageNet class


def standard_crops(names, size: int, mean, std):
    """The standard full-image crop (resize 256, centre crop) of each named shipped photo, normalised."""
    from numcast.models import data

    photos = data.natural_photos()
    return data.image_crops({k: photos[k] for k in names}, len(names), size=size, mean=mean, std=std)


def tiny_llama_folder(folder):
    """A 2-layer random-weight Llama (seeded, the global RNG untouched) saved with SmolLM2's shipped tokenizer:
    a local Hugging Face folder for tests. Returns (folder, model, tokenizer)."""
    import transformers as tf

    from numcast.models.smollm2 import float_folder

    tok = tf.AutoTokenizer.from_pretrained(float_folder())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                                   num_attention_heads=4, intermediate_size=64))  # fmt: skip
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model.eval(), tok


THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
thp_available = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not THP.is_file() or "[never]" in THP.read_text(),
    reason="needs Linux with transparent huge pages not set to never",
)


def smaps_entry(address: int) -> dict[str, str]:
    """The kernel's ``/proc/self/smaps`` entry of the mapping that holds ``address``: field → value text
    (``Rss`` in kB, ``VmFlags``; ``path``: the mapped file, empty for anonymous memory)."""
    entry: dict[str, str] | None = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            if entry is not None:
                break
            lo, hi = (int(v, 16) for v in head.split("-"))
            if lo <= address < hi:
                fields = line.split(maxsplit=5)
                entry = {"path": fields[5] if len(fields) == 6 else ""}
        elif entry is not None:
            entry[head.rstrip(":")] = line.split(maxsplit=1)[1] if len(line.split()) > 1 else ""
    if entry is None:
        raise AssertionError(f"no mapping holds {address:#x}")
    return entry


def vm_flags(address: int) -> set[str]:
    """The kernel's VmFlags of the mapping that holds ``address`` (``hg``: advised to huge pages)."""
    return set(smaps_entry(address)["VmFlags"].split())


def rss_kb(address: int) -> int:
    """Resident kB of the mapping that holds ``address``."""
    return int(smaps_entry(address)["Rss"].split()[0])


def sync_file(path) -> None:
    """Write a just-written file's pages to disk (fsync): the kernel reclaims only clean file pages, so a test of
    giving pages back needs a checkpoint as a user has one, not one still being written back."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def resident_bytes(t: torch.Tensor) -> int:
    """Bytes of the pages holding ``t``'s data that this process has resident (``/proc/self/pagemap``, bit 63:
    page present; kernel doc ``admin-guide/mm/pagemap``), boundary pages included."""
    page = os.sysconf("SC_PAGE_SIZE")
    first, end = t.data_ptr() // page, -(-(t.data_ptr() + t.numel() * t.element_size()) // page)
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        entries = np.frombuffer(f.read((end - first) * 8), dtype=np.uint64)
    return int(((entries >> np.uint64(63)) & np.uint64(1)).sum()) * page
