"""The quantization report: a JSON record (schema below) and a per-layer SQNR plot (PNG).

report.json: ``model``, ``description``, ``recipe``, ``metrics`` {``float``, ``quantized``} (each a dict of
metric -> value), ``primary_metric``, ``higher_is_better``, ``size_bytes`` {``float``, ``packed``},
``bits_per_param`` (quantized layers' weights, scales included), ``wall_time_s`` {``load``, ``calibration``,
``quantize``, ``evaluate``, ``total``}, ``peak_rss_mb``, ``notes`` (list), ``layers`` (one record per module
holding parameters: name, type, action, weight_format, activation_format, method, sqnr_db, reason, params).
"""

from __future__ import annotations

import json
import math
import resource
from pathlib import Path

from torch import nn


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB; Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_sizes(model: nn.Module) -> dict[str, float]:
    """Bytes of the model stored in float32 vs packed (quantized layers at their QTensor size, every other stored
    tensor as it is; tied tensors counted once), and bits per quantized parameter (scales included)."""
    from numcast.nn.modules import _QuantWeightMixin

    q_params = q_bytes = 0
    for m in model.modules():
        if isinstance(m, _QuantWeightMixin):
            q_params += m.weight.numel()
            q_bytes += m.qweight.nbytes
    seen: set[int] = set()
    other = 0
    for t in model.state_dict().values():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        other += t.numel() * t.element_size()
    return {
        "float": other + 4 * q_params,
        "packed": other + q_bytes,
        "bits_per_param": 8 * q_bytes / q_params if q_params else math.nan,
        "quantized_params": q_params,
    }


def write_report(record: dict, out_dir: Path) -> Path:
    path = out_dir / "report.json"
    path.write_text(json.dumps(record, indent=2, default=str))
    return path


def plot_sqnr(layers: list[dict], out_path: Path, title: str) -> Path | None:
    """Bar chart of per-layer output SQNR (dB), in model order; None when no layer has one."""
    pts = [(r["name"], r["sqnr_db"]) for r in layers if r.get("sqnr_db") is not None and math.isfinite(r["sqnr_db"])]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(pts)), 4))
    ax.bar(range(len(pts)), [v for _, v in pts], color="#3b6ea5")
    ax.set_xticks(range(len(pts)))
    ax.set_xticklabels([n for n, _ in pts], rotation=90, fontsize=6)
    ax.set_ylabel("output SQNR (dB)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path
