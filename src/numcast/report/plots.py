"""The report's figures (PNG, matplotlib's Agg backend): per-layer output SQNR of a quantization run, and the
accumulator bits each layer needs (``numcast accumulator``)."""

from __future__ import annotations

import math
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sqnr(layers: list[dict], out_path: Path, title: str) -> Path | None:
    """Bar chart of per-layer output SQNR (dB), in model order; None when no layer has one."""
    pts = [(r["name"], r["sqnr_db"]) for r in layers if r.get("sqnr_db") is not None and math.isfinite(r["sqnr_db"])]
    if not pts:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(pts)), 4))
    ax.bar(range(len(pts)), [v for _, v in pts], color="#3b6ea5")
    ax.set_xticks(range(len(pts)))
    ax.set_xticklabels([n for n, _ in pts], rotation=90, fontsize=6)
    ax.set_ylabel("output SQNR (dB)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120, format="png")
    plt.close(fig)
    return out_path


def plot_accumulator(rows: list[dict], P: int, out_path: Path, title: str) -> Path | None:
    """Grouped bars per layer (``rows``: the analysis records of :mod:`numcast.evaluate.accumulator`): exact,
    A2Q+ rule, A2Q rule and data-type bits, with the accumulator width P."""
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(rows)), 4))
    series = [("exact", "exact_bits", "#3b6ea5"), ("A2Q+ rule", "a2q_plus_bits", "#6aa84f"),
              ("A2Q rule", "a2q_bits", "#e69138"), ("data type", "datatype_bits", "#999999")]  # fmt: skip
    for i, (label, key, color) in enumerate(series):
        ax.bar([j + (i - 1.5) * 0.2 for j in range(len(rows))], [r[key] for r in rows], 0.2, label=label, color=color)
    ax.axhline(P, color="red", linestyle="--", linewidth=1, label=f"P = {P}")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["name"] for r in rows], rotation=90, fontsize=6)
    ax.set_ylabel("accumulator bits needed")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(out_path, dpi=120, format="png")
    plt.close(fig)
    return out_path
