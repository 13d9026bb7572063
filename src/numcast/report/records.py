"""The quantization report: a JSON record (schema below); model sizes and peak memory per phase.

report.json: ``model``, ``description``, ``recipe``, ``metrics`` {``float``, ``quantized``} (each a dict of
metric -> value), ``primary_metric``, ``higher_is_better``, ``size_bytes`` {``float``, ``packed``},
``bits_per_param`` (quantized layers' weights, scales included), ``wall_time_s`` {``load``, ``calibration``,
``quantize``, ``evaluate``, ``total``}, ``peak_rss_mb`` (the run's peak, MiB), ``peak_rss_mb_by_phase``
{``load``, ``evaluate_float``, ``calibration``, ``quantize``, ``evaluate_quantized``, ``export``} (see
:class:`PhasePeaks`), ``notes`` (list), ``layers`` (one record per module
holding parameters: name, type, action, weight_format, activation_format, method, sqnr_db, reason, params).
"""

from __future__ import annotations

import json
import math
import resource
from contextlib import contextmanager
from pathlib import Path

from torch import nn


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB): Linux VmHWM (which :class:`PhasePeaks` resets), else
    ru_maxrss (KiB on Linux)."""
    kib = _proc_status_kib("VmHWM")
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def rss_mb() -> float:
    """Resident memory of this process now (MiB): Linux VmRSS, else the peak so far (:func:`peak_rss_mb`)."""
    kib = _proc_status_kib("VmRSS")
    return kib / 1024 if kib is not None else peak_rss_mb()


def _proc_status_kib(field: str) -> int | None:
    """A kB field of ``/proc/self/status`` (proc(5)), or None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:  # Linux >= 4.0: '5' resets the high-water mark VmHWM to the current RSS (proc(5), clear_refs)
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PhasePeaks:
    """Peak resident memory (MiB) of each phase of a run, each phase on its own: the kernel's high-water mark is
    reset when a phase starts. Where the reset is not permitted, a phase reports the process peak so far and
    ``exact`` is False."""

    def __init__(self) -> None:
        self.peaks: dict[str, float] = {}
        self.exact = True

    @contextmanager
    def phase(self, name: str):
        self.exact &= _reset_peak()
        try:
            yield
        finally:
            self.peaks[name] = peak_rss_mb()

    @property
    def total(self) -> float:
        return max(self.peaks.values(), default=peak_rss_mb())


def model_sizes(model: nn.Module) -> dict[str, float]:
    """Bytes of the model stored in its float dtype (float32, or bfloat16/float16 when loaded so) vs packed
    (quantized layers at their QTensor size, every other stored tensor as it is; tied tensors counted once), and
    bits per quantized parameter (scales included)."""
    from numcast.formats.qtensor import storage_nbytes
    from numcast.nn.modules import QuantWeightModule

    q_params = q_bytes = 0
    for m in model.modules():
        if isinstance(m, QuantWeightModule):  # a layer spilled to disk (offload) has no QTensor in memory
            view = (m.weight_shape[0], math.prod(m.weight_shape[1:]))
            q_params += math.prod(m.weight_shape)
            q_bytes += m.qweight.nbytes if m.qweight is not None else storage_nbytes(view, m.weight_format)
    float_bytes = next((p.element_size() for p in model.parameters() if p.is_floating_point()), 4)
    seen: set[int] = set()
    other = 0
    for t in model.state_dict().values():
        key = id(t) if t.is_meta else t.data_ptr()  # meta tensors (offloaded) have no storage to compare
        if key in seen:
            continue
        seen.add(key)
        other += t.numel() * t.element_size()
    return {
        "float": other + float_bytes * q_params,
        "packed": other + q_bytes,
        "bits_per_param": 8 * q_bytes / q_params if q_params else math.nan,
        "quantized_params": q_params,
    }


def json_safe(obj):
    """``obj`` with every non-finite float replaced by None, so the JSON is valid (no NaN/Infinity tokens)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def json_text(record) -> str:
    """Valid JSON of a record (non-finite numbers as null, :func:`json_safe`)."""
    return json.dumps(json_safe(record), indent=2, default=str, allow_nan=False)


def write_report(record: dict, out_dir: Path) -> Path:
    path = out_dir / "report.json"
    path.write_text(json_text(record))
    return path
