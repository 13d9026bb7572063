"""What an exporter reads (:class:`ExportSource`) and returns (:class:`ExportResult`); shared helpers."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from numcast.nn.modules import QuantWeightModule
from numcast.pipeline.recipe import Recipe


@dataclass
class ExportSource:
    """What an exporter reads.

    - ``model``: the quantized numcast model (its quantized layers are :class:`QuantWeightModule` holding
      QTensors; everything else float), eval mode, on the CPU.
    - ``name``: the model's name (a workload name or the path it was loaded from).
    - ``recipe``: the recipe it was quantized with.
    - ``tokenizer``: text models' Hugging Face tokenizer, else None.
    - ``hf_folder``: the Hugging Face folder the model was loaded from (config.json, tokenizer files), or None.
    - ``gguf_file``: the GGUF file the model was converted from (its metadata and tokenizer), or None.
    - ``report``: the run's report.json record (per-layer ``accumulator_bits`` among others), or None.
    - ``example_inputs``: a batch of real model inputs (tracing, shape inference), or None.
    """

    model: nn.Module
    name: str
    recipe: Recipe
    tokenizer: object = None
    hf_folder: Path | None = None
    gguf_file: Path | None = None
    report: dict | None = None
    example_inputs: object = None


@dataclass
class ExportResult:
    """What was written: ``path`` (a file or a folder), the ``target``, each exported quantized layer's stored
    type (``layers``: numcast layer name → the target's type name) and the layers written unquantized by
    ``float_fallback`` (``float_layers``: name → why the target could not store them)."""

    path: Path
    target: str
    layers: dict[str, str] = field(default_factory=dict)
    float_layers: dict[str, str] = field(default_factory=dict)

    def to_record(self) -> dict:
        return {"path": str(self.path), "target": self.target, "layers": self.layers,
                "float_layers": self.float_layers}  # fmt: skip


def quantized_layers(model: nn.Module) -> dict[str, QuantWeightModule]:
    """The model's quantized layers by name; ``ValueError`` when there are none (an export would prove
    nothing: the user probably passed a float model)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantWeightModule)}
    if not layers:
        raise ValueError(f"{type(model).__name__} has no quantized layer: export a model quantized by numcast "
                         "(numcast quantize ... --out DIR, or numcast.quantize_model)")
    return layers


def copy_files(src: Path, dst: Path, names: tuple[str, ...]) -> list[str]:
    """Copy those of ``names`` that exist in the folder ``src`` into ``dst``; returns the copied names."""
    done = []
    for n in names:
        if (src / n).is_file():
            shutil.copyfile(src / n, dst / n)
            done.append(n)
    return done
