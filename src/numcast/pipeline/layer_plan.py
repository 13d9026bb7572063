"""The per-layer record of a quantization run: :class:`LayerPlan` (every decision about one module that holds
parameters, and what happened to it) and :class:`LayerReport` (its entry in the report). Built and read by
:mod:`numcast.pipeline.plan`, the methods and the runner."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass
class LayerPlan:
    """One module that holds parameters: what is decided for it and, once it is done, what happened.

    ``module`` is the module at ``name`` in the model: the float original until the layer is replaced, then its
    quantized replacement (so the runner holds no float original longer than its block). ``qcls`` is None for a
    layer kept in float (``reason`` says why)."""

    name: str
    module: nn.Module
    kind: str  # the original module's class name
    params: int  # parameters the module holds itself
    qcls: type | None = None
    weight_format: str | None = None
    activation_format: str | None = None
    reason: str | None = None
    method: str | None = None
    sqnr_db: float | None = None  # output SQNR on calibration data (quantized-stream inputs), when measured
    accumulator_bits: int | None = None  # exact accumulator bits the integer weights need (accumulator-aware)

    @property
    def quantized(self) -> bool:
        return self.qcls is not None


@dataclass
class LayerReport:
    """What happened to one module that holds parameters (``report.json``'s ``layers``)."""

    name: str
    type: str
    action: str  # "quantized" | "skipped"
    weight_format: str | None = None
    activation_format: str | None = None
    reason: str | None = None
    params: int = 0
    method: str | None = None
    sqnr_db: float | None = None
    accumulator_bits: int | None = None
