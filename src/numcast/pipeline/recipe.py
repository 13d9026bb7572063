"""The recipe: one validated config (pydantic) for what to quantize, to which formats, by which method.

Loadable from and savable to YAML or JSON (by file suffix). The CLI's ``quantize`` flags map onto these
fields one to one. Format names are checked when the recipe is built, so a typo fails before any work,
with the closest names.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from numcast.accumulator.codes import integer_input_format
from numcast.io import write_atomic
from numcast.pipeline.methods import METHODS, Method, check_method
from numcast.pipeline.settings import (
    AccumulatorSettings,
    AttentionRoundSettings,
    ErrorDiffusionSettings,
    GPTQSettings,
    LayerOverride,
    MixedPrecisionSettings,
    check_format_name,
)

__all__ = ["LayerOverride", "Recipe"]


class Recipe(BaseModel):
    """What to quantize and how.

    - ``weights``: weight format of every quantized layer (e.g. ``mxfp4``, ``int4_g128``).
    - ``activations``: optional input format of quantized layers; ``activation_mode`` ``dynamic`` (scales from
      each tensor) or ``static`` (one per-tensor scale calibrated by ``activation_observer``).
    - ``method``: weight solver, a name in :data:`numcast.pipeline.methods.METHODS` (``rtn``, ``gptq``,
      ``error-diffusion``, ``attention-round``, ``ep-init``); ``calibration``: number of calibration samples
      (needed by every method but rtn, and by static activations).
    - ``accumulator``: an accumulator width every layer must respect (any method; ``ep-init`` needs it).
    - ``mixed_precision``: per-layer weight formats chosen from candidates under a size budget.
    - ``include`` / ``exclude``: globs over module names (``*`` matches dots too); ``overrides`` per layer.
    - Embeddings and the LM head stay in float unless ``quantize_embeddings`` / ``quantize_lm_head``.
    """

    model_config = ConfigDict(extra="forbid")
    weights: str
    activations: str | None = None
    activation_mode: Literal["dynamic", "static"] = "dynamic"
    activation_observer: Literal["minmax", "percentile", "mse"] = "minmax"
    method: str = "rtn"
    calibration: int = Field(128, ge=0)
    include: list[str] = Field(default_factory=lambda: ["*"])
    exclude: list[str] = Field(default_factory=list)
    overrides: list[LayerOverride] = Field(default_factory=list)
    quantize_embeddings: bool = False
    quantize_lm_head: bool = False
    gptq: GPTQSettings = Field(default_factory=GPTQSettings)
    error_diffusion: ErrorDiffusionSettings = Field(default_factory=ErrorDiffusionSettings)
    accumulator: AccumulatorSettings = Field(default_factory=AccumulatorSettings)
    attention_round: AttentionRoundSettings = Field(default_factory=AttentionRoundSettings)
    mixed_precision: MixedPrecisionSettings = Field(default_factory=MixedPrecisionSettings)

    @field_validator("weights", "activations")
    @classmethod
    def _known_format(cls, v: str | None) -> str | None:
        return check_format_name(v)

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        return check_method(v)

    @model_validator(mode="after")
    def _accumulator_inputs(self) -> Recipe:
        """Accumulator-aware recipes need integer inputs with one static scale per tensor: a plain ``int8`` /
        ``uint4`` becomes ``int8_tensor`` / ``uint4_tensor`` with static scales; anything else is refused."""
        if METHODS[self.method].needs_accumulator_bits and self.accumulator.bits is None:
            raise ValueError(
                f"method {self.method!r} needs an accumulator width (accumulator.bits / --accumulator-bits P)"
            )
        if self.accumulator.bits is None:
            return self
        if self.activations is None:
            raise ValueError("accumulator-aware quantization needs integer layer inputs: set activations (e.g. int8)")
        self.activations = integer_input_format(self.activations)
        for o in self.overrides:
            if o.activations is not None:
                o.activations = integer_input_format(o.activations)
        self.activation_mode = "static"
        return self

    @property
    def reads_calibration(self) -> bool:
        """Whether the quantized model depends on calibration data: a method that learns from it, static
        activation scales (accumulator-aware recipes always have them), or formats still to be decided by mixed
        precision. False for weight-only RTN / EP-init, which need no calibration pass."""
        static = self.activations is not None and self.activation_mode == "static"
        return METHODS[self.method].needs_calibration or static or self.mixed_precision.to_decide

    @model_validator(mode="after")
    def _calibration_needed(self) -> Recipe:
        static = self.activations and self.activation_mode == "static"
        if (METHODS[self.method].needs_calibration or static) and self.calibration < 1:
            raise ValueError(f"method {self.method!r} / static activations need calibration samples (calibration >= 1)")
        return self

    def make_method(self, progress: bool = False) -> Method:
        """The weight solver this recipe names (:data:`numcast.pipeline.methods.METHODS`), configured by it."""
        return METHODS[self.method].from_recipe(self, progress)

    # ---- per-layer resolution -------------------------------------------------------------------
    def layer_settings(self, name: str) -> tuple[str | None, str | None, str | None]:
        """(weight format, activation format, skip reason) for module ``name``."""
        if not any(fnmatch.fnmatchcase(name, p) for p in self.include):
            return None, None, "not matched by include"
        if any(fnmatch.fnmatchcase(name, p) for p in self.exclude):
            return None, None, "matched by exclude"
        w, a = self.weights, self.activations
        for o in self.overrides:
            if fnmatch.fnmatchcase(name, o.pattern):
                if o.skip:
                    return None, None, f"skipped by override {o.pattern!r}"
                w = o.weights or w
                a = o.activations or a
        return w, a, None

    def with_overrides(self, extra: list[LayerOverride]) -> Recipe:
        """A deep copy with ``extra`` appended to the per-layer overrides (decisions taken while quantizing)."""
        resolved = self.model_copy(deep=True)
        resolved.overrides = [*resolved.overrides, *extra]
        return resolved

    # ---- files ----------------------------------------------------------------------------------
    def save(self, path: str | Path, *, overwrite: bool = False) -> None:
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        data = self.model_dump(mode="json")
        if path.suffix.lower() in (".yaml", ".yml"):
            write_atomic(path, lambda tmp: tmp.write_text(yaml.safe_dump(data, sort_keys=False)))
        elif path.suffix.lower() == ".json":
            write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2)))
        else:
            raise ValueError(f"{path}: recipes are .yaml, .yml or .json")

    @staticmethod
    def load(path: str | Path) -> Recipe:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such recipe file")
        if path.suffix.lower() not in (".yaml", ".yml", ".json"):
            raise ValueError(f"{path}: recipes are .yaml, .yml or .json")
        try:
            text = path.read_text()
            data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
        except (UnicodeDecodeError, yaml.YAMLError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a valid recipe file ({exc})") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a recipe is a mapping of settings")
        return Recipe.model_validate(data)
