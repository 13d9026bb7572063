"""``quantize_model``: swap a model's layers for numcast's quantized ones by recipe, and say what happened to
every module that holds parameters (no layer is skipped silently)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from numcast.nn.act_quant import ActQuantizer
from numcast.nn.surgery import quant_class, set_module, why_not_quantizable
from numcast.pipeline.recipe import Recipe


@dataclass
class LayerReport:
    name: str
    type: str
    action: str  # "quantized" | "skipped"
    weight_format: str | None = None
    activation_format: str | None = None
    reason: str | None = None
    params: int = 0


@dataclass
class QuantizationResult:
    model: nn.Module
    layers: list[LayerReport] = field(default_factory=list)

    @property
    def quantized(self) -> list[LayerReport]:
        return [r for r in self.layers if r.action == "quantized"]

    @property
    def skipped(self) -> list[LayerReport]:
        return [r for r in self.layers if r.action == "skipped"]

    def to_records(self) -> list[dict]:
        return [asdict(r) for r in self.layers]


def _is_lm_head(name: str) -> bool:
    return name == "lm_head" or name.endswith(".lm_head")


def quantize_model(
    model: nn.Module,
    recipe: Recipe,
    calibration: Iterable | None = None,
    *,
    inplace: bool = False,
) -> QuantizationResult:
    """Quantize ``model`` by ``recipe`` with round-to-nearest weights (``method="rtn"``).

    ``calibration`` (an iterable of model inputs: tensors, tuples or dicts of keyword arguments) is needed
    for static activation scales; it is checked before any work. GPTQ needs the layer-wise calibration
    runner and is refused here with that reason.
    """
    if recipe.method != "rtn":
        raise ValueError(f"method {recipe.method!r} runs in the layer-wise calibration pipeline, not in quantize_model")
    static = recipe.activations is not None and recipe.activation_mode == "static"
    batches = None
    if static:
        batches = list(calibration) if calibration is not None else []
        if not batches:
            raise ValueError("static activation scales need calibration data (got none)")
    if not inplace:
        model = copy.deepcopy(model)
    report: list[LayerReport] = []
    todo = []
    for name, module in model.named_modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        if own == 0:
            continue
        kind = type(module).__name__
        qcls = quant_class(module)
        if qcls is None:
            reason = why_not_quantizable(module)
            report.append(LayerReport(name, kind, "skipped", reason=reason, params=own))
            if "not supported" in reason or "no numcast" in reason:
                warnings.warn(f"numcast cannot quantize {name} ({reason})", stacklevel=2)
            continue
        if isinstance(module, nn.Embedding) and not recipe.quantize_embeddings:
            report.append(
                LayerReport(
                    name, kind, "skipped", reason="embeddings stay in float (quantize_embeddings=False)", params=own
                )
            )
            continue
        if _is_lm_head(name) and not recipe.quantize_lm_head:
            report.append(
                LayerReport(name, kind, "skipped", reason="LM head stays in float (quantize_lm_head=False)", params=own)
            )
            continue
        w, a, why = recipe.layer_settings(name)
        if why:
            report.append(LayerReport(name, kind, "skipped", reason=why, params=own))
            continue
        if isinstance(module, nn.Embedding):
            a = None
        todo.append((name, module, qcls, w, a))
        report.append(LayerReport(name, kind, "quantized", w, a, params=own))
    for name, module, qcls, w, a in todo:
        kwargs = {}
        if a is not None:
            axis = 1 if isinstance(module, (nn.Conv1d, nn.Conv2d)) else -1
            kwargs["input_format"] = ActQuantizer(a, recipe.activation_mode, recipe.activation_observer, axis)
        set_module(model, name, qcls(module, w, **kwargs))
    if static:
        _calibrate_activations(model, batches)
    return QuantizationResult(model, report)


@torch.no_grad()
def _calibrate_activations(model: nn.Module, batches: list) -> None:
    quants = [m for m in model.modules() if isinstance(m, ActQuantizer) and m.mode == "static"]
    for q in quants:
        q.start_calibration()
    for b in batches:
        if isinstance(b, dict):
            model(**b)
        elif isinstance(b, (tuple, list)):
            model(*b)
        else:
            model(b)
    for q in quants:
        q.finish_calibration()
