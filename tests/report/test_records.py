"""Report records: per-phase peak memory, model sizes with tied tensors, the SQNR plot."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from numcast.report.plots import plot_sqnr
from numcast.report.records import PhasePeaks, model_sizes


def test_phase_peaks_are_per_phase():
    import mmap

    mem = PhasePeaks()
    with mem.phase("big"):  # 64 MiB of fresh anonymous pages, touched (an allocator could reuse resident memory)
        m = mmap.mmap(-1, 64 * 2**20)
        m.write(b"\x01" * len(m))
        m.close()
    with mem.phase("small"):
        y = torch.ones(1024)
        del y
    assert mem.peaks["big"] >= mem.peaks["small"] + (0 if not mem.exact else 48)
    assert mem.total == max(mem.peaks.values())
    if not mem.exact:
        pytest.skip("this kernel refuses to reset the peak (clear_refs): phases report the process peak")


def test_model_sizes_count_tied_tensors_once():
    emb = nn.Embedding(100, 8)
    head = nn.Linear(8, 100, bias=False)
    head.weight = emb.weight
    s = model_sizes(nn.ModuleDict({"emb": emb, "head": head}))
    assert s["float"] == s["packed"] == 100 * 8 * 4 and math.isnan(s["bits_per_param"])


def test_plot_sqnr_skips_layers_without_a_finite_value(tmp_path):
    layers = [{"name": "a", "sqnr_db": 20.0}, {"name": "b", "sqnr_db": math.inf}, {"name": "c", "sqnr_db": None}]
    assert plot_sqnr(layers, tmp_path / "p.png", "t") == tmp_path / "p.png"
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert plot_sqnr(layers[1:], tmp_path / "q.png", "t") is None and not (tmp_path / "q.png").exists()
