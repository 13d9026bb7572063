"""Activation (input/output) quantization: dynamic or static (calibrated) scales.

- ``dynamic``: the format's own scales are computed from each tensor as it flows (per block for MX/NVFP4,
  per tensor for ``*_tensor`` formats...): exactly ``numcast.cast``.
- ``static``: one per-tensor scale is calibrated on data and then frozen, for formats with per-tensor
  scaling (``int8_tensor``, ``fp8_e4m3_tensor``, ...). Observers: ``minmax`` (amax seen), ``percentile``
  (the 99.99th percentile of |x|), ``mse`` (the clipping amax among 100 candidates in (0, amax] that
  minimises the quantization MSE of the observed data).

Blocks run along the reduction axis of the consuming layer: the last axis for Linear inputs, the channel
axis (1) for convolution inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from numcast.formats.element import work_dtype
from numcast.formats.engine import grid_cast
from numcast.formats.ops import cast
from numcast.formats.registry import FormatLike, get_format
from numcast.formats.scale import Scales

ACTIVATION_MODES = ("dynamic", "static")
OBSERVERS = ("minmax", "percentile", "mse")


class ActQuantizer(nn.Module):
    """Fake-quantizes activations to ``fmt``; ``axis`` is the reduction axis blocks run along."""

    def __init__(self, fmt: FormatLike, mode: str = "dynamic", observer: str = "minmax", axis: int = -1) -> None:
        super().__init__()
        fmt = get_format(fmt)
        if mode not in ACTIVATION_MODES:
            raise ValueError(f"unknown activation mode {mode!r}; one of {ACTIVATION_MODES}")
        if observer not in OBSERVERS:
            raise ValueError(f"unknown observer {observer!r}; one of {OBSERVERS}")
        if mode == "static" and fmt.scaling.granularity != "tensor":
            raise ValueError(
                f"static activation scales need a per-tensor format (e.g. int8_tensor, fp8_e4m3_tensor), "
                f"got {fmt.label} ({fmt.scaling.granularity} scaling); use mode='dynamic'"
            )
        if mode == "static" and fmt.scaling.zero_point:
            raise ValueError(f"static activation scales support symmetric formats only, got {fmt.label}")
        if fmt.scaling.granularity == "block":
            fmt = fmt.with_(scaling=replace(fmt.scaling, axis=axis), name=fmt.name)
        self.fmt, self.mode, self.observer = fmt, mode, observer
        self.register_buffer("amax", torch.zeros(()), persistent=True)
        self.calibrating = False
        self.bypass = False  # pass inputs through unchanged (the block-wise runner, until this layer's block is done)
        # while calibrating: the part of an input to observe (the pipeline leaves padding tokens out); None: all of it
        self.observed_rows: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._seen: list[torch.Tensor] = []

    @property
    def calibrated(self) -> bool:
        return self.mode == "dynamic" or bool(self.amax > 0)

    def start_calibration(self) -> None:
        self.calibrating, self._seen = True, []

    def finish_calibration(self) -> None:
        """Freeze the static scale from what was observed (``ValueError`` if nothing was)."""
        self.calibrating = False
        if self.mode != "static":
            return
        if not self._seen:
            raise ValueError("static activation quantizer saw no calibration data")
        data = torch.cat(self._seen)
        self._seen = []
        self.amax.fill_(self._choose_amax(data))

    def _choose_amax(self, a: torch.Tensor) -> float:
        amax = float(a.max())
        if self.observer == "minmax" or amax == 0:
            return amax
        if self.observer == "percentile":
            k = max(1, int(round(0.9999 * a.numel())))
            return float(a.float().kthvalue(k).values)
        best, best_err = amax, float("inf")
        for frac in torch.linspace(0.01, 1.0, 100).tolist():
            c = amax * frac
            q = self._apply_static(a, c)
            err = float((q - a).square().mean())
            if err < best_err:
                best, best_err = c, err
        return best

    def scales_for(self, amax: float) -> Scales:
        """The scales the format gives a tensor whose amax is ``amax`` (cached per amax)."""
        cached = getattr(self, "_scale_cache", None)
        if cached is None or cached[0] != amax:
            sc = grid_cast(torch.tensor([[amax]], dtype=torch.float32), self.fmt).scales
            cached = (amax, Scales(sc.scale, sc.tensor_scale, sc.zero_point))
            self._scale_cache = cached
        return cached[1]

    def _apply_static(self, x: torch.Tensor, amax: float) -> torch.Tensor:
        scales = self.scales_for(amax)
        el = self.fmt.element
        if (x.dtype == torch.float32 and el.kind == "int" and not el.frac_bits and scales.tensor_scale is None
                and scales.zero_point is None and self.fmt.rounding == "nearest_even"):  # fmt: skip
            # the same arithmetic as the general path, fused into four ops in its work dtype (training speed; float64
            # for an FP32 scale, where a float32 x/s can land on a midpoint it is not at); tested equal
            work = work_dtype(el, self.fmt.scaling, x.dtype)
            s = scales.scale.to(work)
            y = torch.round(x.to(work) / s).clamp_(el.qmin, el.qmax).mul_(s).add_(0.0)  # +0.0: zeros unsigned
            return torch.where(torch.isfinite(x), y.to(x.dtype), torch.full_like(x, math.nan))
        return grid_cast(x, self.fmt, scales=scales).output(x.shape, x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bypass:
            return x
        if self.calibrating:
            if self.mode == "static":
                seen = x.detach() if self.observed_rows is None else self.observed_rows(x.detach())
                sample = seen.abs().reshape(-1).float()
                if sample.numel() > 1 << 16:  # bounded memory: a deterministic stride sample
                    sample = sample[:: sample.numel() // (1 << 16) + 1]
                self._seen.append(sample.cpu())
            return x
        if self.mode == "dynamic":
            return cast(x, self.fmt)
        if not self.calibrated:
            raise RuntimeError("static activation quantizer used before calibration (run the calibration pass)")
        y = self._apply_static(x.detach(), float(self.amax))
        if not x.requires_grad:
            return y
        a, lo = float(self.amax), -float(self.amax) if self.fmt.element.signed else 0.0
        inside = (x.detach() >= lo) & (x.detach() <= a)  # clipped straight-through gradient (training through it)
        return x * inside + (y - x * inside).detach()

    def extra_repr(self) -> str:
        return f"{self.fmt.label}, mode={self.mode}" + (f", observer={self.observer}" if self.mode == "static" else "")


@torch.no_grad()
def calibrate(quants: list[ActQuantizer], run: Callable[[], object]) -> None:
    """Calibrate the static quantizers ``quants`` (pass-through switched off) on what ``run()`` feeds them, in
    one pass; a no-op without quantizers."""
    if not quants:
        return
    for q in quants:
        q.bypass = False
        q.start_calibration()
    run()
    for q in quants:
        q.finish_calibration()
