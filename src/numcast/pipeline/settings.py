"""The sections of a recipe (pydantic): per-layer overrides and each method's or feature's settings.

They live apart from :class:`numcast.pipeline.recipe.Recipe` so the methods (:mod:`numcast.pipeline.methods`)
can be configured by them without importing the recipe, which validates its method against the methods' table.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from numcast.formats.registry import get_format


def check_format_name(v: str | None) -> str | None:
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
        return check_format_name(v)


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
    ``sigma_end`` grid steps; ``k_nearest`` levels per weight (None: the whole grid up to 16 levels, else the 8
    nearest; :func:`numcast.algorithms.attention_round.attended_levels`); ``variant`` soft (expectation) or sampled;
    ``seed`` for the sampled variant and the mini-batches; ``time_budget_s`` per block (or layer); ``batch_size``
    calibration samples per step of a block reconstruction, drawn afresh each step from all the cached samples
    (None: one whole calibration batch per step; :class:`numcast.algorithms.attention_round.MiniBatches`)."""

    model_config = ConfigDict(extra="forbid")
    objective: Literal["block", "layer"] = "block"
    iterations: int = Field(500, ge=0)
    lr: float = Field(5e-2, gt=0)
    sigma_start: float = Field(0.5, gt=0)
    sigma_end: float = Field(0.01, gt=0)
    k_nearest: int | None = Field(None, ge=1)
    variant: Literal["soft", "sampled"] = "soft"
    seed: int = 0
    time_budget_s: float | None = Field(None, gt=0)
    batch_size: int | None = Field(16, ge=1)  # = attention_round.DEFAULT_BATCH_SIZE (tested)


_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def budget_bits(text: str, params: int) -> float:
    """Total bits allowed for ``params`` quantized weights: ``"4.5bits"`` (average bits per parameter, scales
    included) or a size with its unit (``"250000B"``, ``"250kB"``, ``"1.5MiB"``). A number without a unit is
    refused (bits per parameter or bytes would differ by 8 × params)."""
    t = text.strip().lower().replace(" ", "")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)(bits?|bpp)", t)
    if m:
        return float(m.group(1)) * params
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)([kmg]i?b|b)", t)
    if not m:
        raise ValueError(f"budget {text!r}: give average bits per parameter ('4.5bits') or a size with its unit "
                         "('250kB', '1.5MiB', '250000B')")  # fmt: skip
    return float(m.group(1)) * _UNITS[m.group(2)] * 8


class MixedPrecisionSettings(BaseModel):
    """Per-layer weight formats under a size budget (:mod:`numcast.pipeline.mixed_precision`): ``strategy``
    ``lcl`` (relative output noise weighted by the outputs' lossy coding length) or ``sensitivity`` (relative
    output noise alone), each minimised exactly under the budget; ``candidates`` the formats to choose from;
    ``budget`` average bits per parameter (``"4.5bits"``) or bytes (``"250kB"``); ``eps`` the relative
    distortion at which ``lcl`` measures the coding length. ``decided``: the formats were chosen and are in the
    recipe's per-layer overrides (a saved recipe replays them instead of allocating again)."""

    model_config = ConfigDict(extra="forbid")
    strategy: Literal["lcl", "sensitivity"] | None = None
    candidates: list[str] = Field(default_factory=list)
    budget: str | None = None
    eps: float = Field(0.1, gt=0)
    decided: bool = False

    @property
    def to_decide(self) -> bool:
        """A strategy is set and its formats are not chosen yet."""
        return self.strategy is not None and not self.decided

    @field_validator("budget")
    @classmethod
    def _budget_with_unit(cls, v: str | None) -> str | None:
        if v is not None:
            budget_bits(v, 1)  # raises ValueError naming the accepted forms
        return v

    @field_validator("candidates")
    @classmethod
    def _known_formats(cls, v: list[str]) -> list[str]:
        for name in v:
            check_format_name(name)
        return v

    @model_validator(mode="after")
    def _complete(self) -> MixedPrecisionSettings:
        if self.strategy is not None and (len(self.candidates) < 2 or not self.budget):
            raise ValueError("mixed precision needs at least two candidate formats and a budget (e.g. 4.5bits)")
        if self.strategy is None and (self.candidates or self.budget):
            raise ValueError("candidates / budget do nothing without a mixed-precision strategy (--mixed-precision "
                             "lcl or sensitivity)")  # fmt: skip
        return self


class ErrorDiffusionSettings(BaseModel):
    """``scale_rule``: when a block-scaled format's shared scales are fixed — ``static`` (from the float
    weights) or ``dynamic`` (from the updated targets when the block's first column is reached).
    ``order``: the column visiting order — ``strong-first`` (default), ``weak-first``, ``natural``, or ``auto``
    (per layer, the better of strong- and weak-first by the layer objective) (see
    :mod:`numcast.algorithms.error_diffusion`).
    ``calibrate_float_layers``: also re-fit the float weights of linear/conv layers kept in float inside the
    blocks (excluded by the recipe) so they absorb the error arriving from upstream (Q = identity).
    ``rtn_guard``: the RTN-quantized model runs beside the solved one on every 8th calibration batch;
    when its output ends closer to the float model's, every solved layer takes its RTN weights
    (:class:`numcast.pipeline.runner.RTNGuard`; the layers' reports say so).
    ``damp``: a ridge toward the float weight, λ = damp · mean(diag H) added to the diagonals of both Gram
    matrices (default 0.01, GPTQ's damping of the same mean; 0: none, the paper's method; measured in the README's
    PTQ section, ablation ``error-diffusion-nodamp``)."""

    model_config = ConfigDict(extra="forbid")
    scale_rule: Literal["static", "dynamic"] = "static"
    order: Literal["strong-first", "weak-first", "natural", "auto"] = "strong-first"
    calibrate_float_layers: bool = False
    rtn_guard: bool = True
    damp: float = Field(0.01, ge=0.0, le=1.0)


