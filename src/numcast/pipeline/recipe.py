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
from numcast.formats.registry import get_format

METHODS = ("rtn", "gptq", "error-diffusion", "ep-init", "attention-round")


def _check_format(v: str | None) -> str | None:
    if v is not None:
        get_format(v)  # raises ValueError naming the closest formats
    return v


class LayerOverride(BaseModel):
    """Per-layer settings for module names matching ``pattern`` (a glob); later overrides win."""

    model_config = ConfigDict(extra="forbid")
    pattern: str
    weights: str | None = None
    activations: str | None = None
    skip: bool = False

    @field_validator("weights", "activations")
    @classmethod
    def _known_format(cls, v: str | None) -> str | None:
        return _check_format(v)


class GPTQSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    damp: float = Field(0.01, ge=0.0, le=1.0)
    block_size: int = Field(128, ge=1)
    act_order: bool = False


class AccumulatorSettings(BaseModel):
    """Accumulator-aware quantization (A2Q / A2Q+, papers.md §3; :mod:`numcast.pipeline.accumulator`).

    ``bits``: the accumulator width P every quantized layer must never overflow (None: no constraint; the
    ``ep-init`` method needs it). ``rule``: the per-channel budget, ``a2q+`` (Σq⁺ and Σ|q⁻| each within half
    of (2^P − 2)/(2^N − 1): about twice A2Q's for unsigned inputs) or ``a2q`` (‖q‖₁ ≤ (2^(P−1) − 1)·2^(1_s − N)).
    ``rounding``: ``budget`` (round to nearest where the budget allows) or ``toward_zero`` (the papers').
    ``input_sign``: ``auto`` gives a layer whose calibration inputs are never negative the unsigned twin of the
    activation format (``int8_tensor`` → ``uint8_tensor``: post-ReLU inputs, one more bit of range), recorded
    as a per-layer override in the saved recipe; ``format`` keeps the format as given."""

    model_config = ConfigDict(extra="forbid")
    bits: int | None = Field(None, ge=2, le=62)
    rule: Literal["a2q", "a2q+"] = "a2q+"
    rounding: Literal["budget", "toward_zero"] = "budget"
    input_sign: Literal["auto", "format"] = "auto"


class AttentionRoundSettings(BaseModel):
    """Attention Round (:mod:`numcast.algorithms.attention_round`): ``objective`` ``block`` (reconstruct each
    block's float output, all its layers together) or ``layer`` (each layer's output error alone); Adam
    ``iterations`` at ``lr`` on the offsets (per block, or per layer) while σ anneals from ``sigma_start`` to
    ``sigma_end`` grid steps; ``k_nearest`` levels per weight; ``variant`` soft (expectation) or sampled;
    ``seed`` for the sampled variant; ``time_budget_s`` per block (or layer)."""

    model_config = ConfigDict(extra="forbid")
    objective: Literal["block", "layer"] = "block"
    iterations: int = Field(500, ge=0)
    lr: float = Field(5e-2, gt=0)
    sigma_start: float = Field(0.5, gt=0)
    sigma_end: float = Field(0.01, gt=0)
    k_nearest: int | None = Field(8, ge=1)
    variant: Literal["soft", "sampled"] = "soft"
    seed: int = 0
    time_budget_s: float | None = Field(None, gt=0)


class MixedPrecisionSettings(BaseModel):
    """Per-layer weight formats under a size budget (:mod:`numcast.pipeline.mixed_precision`): ``strategy``
    ``lcl`` (relative output noise weighted by the outputs' lossy coding length) or ``sensitivity`` (relative
    output noise alone), each minimised exactly under the budget; ``candidates`` the formats to choose from;
    ``budget`` average bits per parameter (``"4.5bits"``) or bytes (``"250kB"``); ``eps`` the relative
    distortion at which ``lcl`` measures the coding length."""

    model_config = ConfigDict(extra="forbid")
    strategy: Literal["lcl", "sensitivity"] | None = None
    candidates: list[str] = Field(default_factory=list)
    budget: str | None = None
    eps: float = Field(0.1, gt=0)

    @field_validator("candidates")
    @classmethod
    def _known_formats(cls, v: list[str]) -> list[str]:
        for name in v:
            _check_format(name)
        return v

    @model_validator(mode="after")
    def _complete(self) -> MixedPrecisionSettings:
        if self.strategy is not None and (len(self.candidates) < 2 or not self.budget):
            raise ValueError("mixed precision needs at least two candidate formats and a budget (e.g. 4.5bits)")
        return self


class ErrorDiffusionSettings(BaseModel):
    """``scale_rule``: when a block-scaled format's shared scales are fixed — ``static`` (from the float
    weights) or ``dynamic`` (from the updated targets when the block's first column is reached).
    ``order``: the column visiting order — ``strong-first`` (default), ``weak-first``, ``natural``, or ``auto``
    (per layer, the better of strong- and weak-first by the layer objective) (see
    :mod:`numcast.algorithms.error_diffusion`).
    ``calibrate_float_layers``: also re-fit the float weights of linear/conv layers kept in float inside the
    blocks (excluded by the recipe) so they absorb the error arriving from upstream (Q = identity)."""

    model_config = ConfigDict(extra="forbid")
    scale_rule: Literal["static", "dynamic"] = "static"
    order: Literal["strong-first", "weak-first", "natural", "auto"] = "strong-first"
    calibrate_float_layers: bool = False


class Recipe(BaseModel):
    """What to quantize and how.

    - ``weights``: weight format of every quantized layer (e.g. ``mxfp4``, ``int4_g128``).
    - ``activations``: optional input format of quantized layers; ``activation_mode`` ``dynamic`` (scales from
      each tensor) or ``static`` (one per-tensor scale calibrated by ``activation_observer``).
    - ``method``: weight solver (``rtn``, ``gptq``, ``error-diffusion``, ``ep-init``,
      ``attention-round``); ``calibration``: number of
      calibration samples (needed by every method but rtn, and by static activations).
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
    method: Literal["rtn", "gptq", "error-diffusion", "ep-init", "attention-round"] = "rtn"
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
        return _check_format(v)

    @model_validator(mode="after")
    def _accumulator_inputs(self) -> Recipe:
        """Accumulator-aware recipes need integer inputs with one static scale per tensor: a plain ``int8`` /
        ``uint4`` becomes ``int8_tensor`` / ``uint4_tensor`` with static scales; anything else is refused."""
        if self.method == "ep-init" and self.accumulator.bits is None:
            raise ValueError("method 'ep-init' needs an accumulator width (accumulator.bits / --accumulator-bits P)")
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

    @model_validator(mode="after")
    def _calibration_needed(self) -> Recipe:
        if (self.method != "rtn" or (self.activations and self.activation_mode == "static")) and self.calibration < 1:
            raise ValueError(f"method {self.method!r} / static activations need calibration samples (calibration >= 1)")
        return self

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
            path.write_text(yaml.safe_dump(data, sort_keys=False))
        elif path.suffix.lower() == ".json":
            path.write_text(json.dumps(data, indent=2))
        else:
            raise ValueError(f"{path}: recipes are .yaml, .yml or .json")

    @staticmethod
    def load(path: str | Path) -> Recipe:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such recipe file")
        text = path.read_text()
        if path.suffix.lower() in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        elif path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            raise ValueError(f"{path}: recipes are .yaml, .yml or .json")
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a recipe is a mapping of settings")
        return Recipe.model_validate(data)
