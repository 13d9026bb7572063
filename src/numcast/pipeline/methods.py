"""The weight solvers as the pipeline sees them, and the one table of them (:data:`METHODS`).

A method is a class registered under its name (:func:`register_method`); the recipe's validation, the CLI's
``--method`` choices and the runner (through :meth:`numcast.pipeline.recipe.Recipe.make_method`) all read
:data:`METHODS`. A method is configured by its own section of the recipe (``settings_field``) and the
accumulator settings, so this module does not import the recipe. What a method needs from the runner is declared
on the class (:class:`Method`'s capabilities), never guessed from outside. Each method's work is inside its
class: the statistics it gathers (:mod:`numcast.pipeline.layer_stats`) and the call to its tensor-level
algorithm in :mod:`numcast.algorithms`. Under an accumulator-aware recipe :meth:`Method.quantize_layer` fits
every solution into the layer's budget (:mod:`numcast.pipeline.accumulator`).
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from numcast.algorithms.attention_round import attention_round, layer_output_loss, round_block
from numcast.algorithms.error_diffusion import error_diffusion
from numcast.algorithms.gptq import gptq
from numcast.algorithms.rtn import rtn
from numcast.formats.qtensor import QTensor
from numcast.formats.registry import get_format
from numcast.pipeline import distributed
from numcast.pipeline.accumulator import ep_init_qweight, within_budget
from numcast.pipeline.layer_plan import LayerPlan
from numcast.pipeline.layer_stats import GramStatistics, HessianStatistics
from numcast.pipeline.settings import AccumulatorSettings

METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available under ``cls.name`` (recipes, CLI, runner)."""
    if not cls.name or cls.name in METHODS:
        raise ValueError(f"a method needs a new, non-empty name; got {cls.name!r}")
    METHODS[cls.name] = cls
    return cls


def check_method(name: str) -> str:
    """``name`` if it is a registered method; ``ValueError`` naming the closest ones otherwise."""
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown method {name!r}{hint} (one of {', '.join(METHODS)})")
    return name


class Method:
    """A weight solver. Capabilities (read by the recipe, the CLI and the runner; a subclass overrides them as
    class attributes, or in ``__init__`` when they depend on the recipe):

    - ``needs_calibration``: it only runs in the block-wise runner, on calibration data (False: it solves a
      layer from its weights alone, also in :func:`numcast.pipeline.data_free.quantize_data_free`).
    - ``needs_accumulator_bits``: the recipe must set an accumulator width.
    - ``needs_inputs``: the runner feeds every layer's quantized-stream inputs to :meth:`statistics`.
    - ``needs_float_inputs``: ... and the float stream's inputs of the same tokens, in lock step (the runner then
      keeps the float stream).
    - ``solves_blocks``: :meth:`solve_block` solves all layers of a block together.
    - ``refits_float_layers``: layers kept in float inside the blocks get :meth:`refit_float`.
    - ``guards_with_rtn``: the runner runs the RTN model beside the solved one on every 8th calibration batch and
      gives every solved layer its RTN weights when RTN's output ends closer to float's
      (:class:`numcast.pipeline.runner.RTNGuard`).
    """

    name: ClassVar[str] = ""
    settings_field: ClassVar[str | None] = None  # the recipe section that configures it (``gptq``, ...)
    needs_calibration: ClassVar[bool] = True
    needs_accumulator_bits: ClassVar[bool] = False
    needs_inputs: bool = False
    needs_float_inputs: bool = False
    solves_blocks: bool = False
    refits_float_layers: bool = False
    guards_with_rtn: bool = False

    def __init__(self, settings=None, accumulator: AccumulatorSettings | None = None, progress: bool = False) -> None:
        self.settings = settings  # the recipe section ``settings_field`` (None for methods without one)
        self.accumulator = accumulator or AccumulatorSettings()
        self.progress = progress  # per-layer or per-block progress bars

    @property
    def rounds_to_nearest_only(self) -> bool:
        """Whether every layer's QTensor is its weight rounded to nearest with the format's own scaling and nothing
        more (RTN without an accumulator budget): :func:`~numcast.pipeline.data_free.quantize_data_free` then lets
        the quantized layer round its weight itself, which keeps the cast as its float weight instead of decoding
        the codes again."""
        return False

    @classmethod
    def from_recipe(cls, recipe, progress: bool = False) -> Method:
        """The method configured by a :class:`~numcast.pipeline.recipe.Recipe`."""
        return cls(getattr(recipe, cls.settings_field) if cls.settings_field else None, recipe.accumulator, progress)

    def statistics(self, module: nn.Module):
        """A fresh statistics object for ``module`` (``add(module, x_quant, x_float)`` per batch), or None."""
        return None

    def solve(self, plan: LayerPlan, stats) -> QTensor:
        """The layer's QTensor (the 2-D weight view ``[out, in/groups·Πk]``) from its statistics."""
        raise NotImplementedError

    def solve_block(self, block: nn.Module, plans: list[LayerPlan], names: dict[str, str],
                    inputs: Callable[[int], tuple[tuple, dict]], targets: list[torch.Tensor],
                    masks: list[torch.Tensor | None] | None = None) -> dict[str, QTensor]:  # fmt: skip
        """``solves_blocks`` methods: {plan name: QTensor} for the ``plans`` of ``block`` at once; ``names[plan
        name]`` is the layer's name inside the block, ``inputs(i)`` the block's arguments on calibration batch i (the
        quantized stream), ``targets[i]`` the float block's output on the float stream, ``masks[i]`` its rows
        that count (bool ``[samples, tokens]``: a padded batch's real tokens; None: every row)."""
        raise NotImplementedError

    def refit_float(self, module: nn.Module, stats) -> None:
        """``refits_float_layers`` methods: re-fit the float weights of ``module`` in place."""
        raise NotImplementedError

    def quantize_layer(self, plan: LayerPlan, stats=None, solved: QTensor | None = None) -> QTensor:
        """The QTensor the layer ends with: ``solved`` (from :meth:`solve_block`) or :meth:`solve`, fitted into
        the accumulator budget when the recipe sets one."""
        qt = solved if solved is not None else self.solve(plan, stats)
        if self.accumulator.bits is not None:
            qt = within_budget(plan, qt, self.accumulator)
        return qt


def _weight_2d(module: nn.Module) -> torch.Tensor:
    return module.weight.detach().reshape(module.weight.shape[0], -1)


@register_method
class RTN(Method):
    """Round to nearest with the format's own scaling (:func:`numcast.algorithms.rtn.rtn`)."""

    name = "rtn"
    needs_calibration = False

    @property
    def rounds_to_nearest_only(self) -> bool:  # not for a subclass that solves or fits layers its own way
        cls = type(self)
        return self.accumulator.bits is None and cls.solve is RTN.solve and cls.quantize_layer is Method.quantize_layer

    def solve(self, plan: LayerPlan, stats=None) -> QTensor:
        return rtn(plan.module.weight, plan.weight_format)


@register_method
class GPTQ(Method):
    """GPTQ (:func:`numcast.algorithms.gptq.gptq`) on the Hessian of the quantized stream's inputs."""

    name = "gptq"
    settings_field = "gptq"
    needs_inputs = True

    def statistics(self, module: nn.Module) -> HessianStatistics:
        return HessianStatistics()

    def solve(self, plan: LayerPlan, stats: HessianStatistics) -> QTensor:
        st = self.settings
        h = stats.result(column_major=True)  # a fresh buffer (or the spent statistics' own): GPTQ factors it in place
        return gptq(_weight_2d(plan.module), h, get_format(plan.weight_format), damp=st.damp,
                    block_size=st.block_size, act_order=st.act_order, overwrite_h=True).qtensor  # fmt: skip


@register_method
class ErrorDiffusion(Method):
    """Error Diffusion (:func:`numcast.algorithms.error_diffusion.error_diffusion`) over the float and the
    quantized stream; optionally re-fits the float layers inside the blocks (Q = identity)."""

    name = "error-diffusion"
    settings_field = "error_diffusion"
    needs_inputs = True
    needs_float_inputs = True

    def __init__(self, settings, accumulator=None, progress: bool = False) -> None:
        super().__init__(settings, accumulator, progress)
        self.refits_float_layers = settings.calibrate_float_layers
        self.guards_with_rtn = settings.rtn_guard

    def statistics(self, module: nn.Module) -> GramStatistics:
        return GramStatistics()

    def solve(self, plan: LayerPlan, stats: GramStatistics) -> QTensor:
        st = self.settings
        g, h = stats.result()
        if stats.unpaired_batches:
            warnings.warn(f"{plan.name}: the float and the quantized stream routed different tokens to this layer in "
                          f"{stats.unpaired_batches} batch(es); for those, Error Diffusion targets the quantized "
                          "stream's inputs (GPTQ's objective)", stacklevel=2)  # fmt: skip
        return error_diffusion(_weight_2d(plan.module), g, h, get_format(plan.weight_format), scale_rule=st.scale_rule,
                               order=st.order, damp=st.damp, overwrite_gram=True).qtensor  # fmt: skip

    def refit_float(self, module: nn.Module, stats: GramStatistics) -> None:
        """Layer calibration: the same diffusion with Q = identity; the float weight is replaced in place."""
        g, h = stats.result()
        st = self.settings
        new = error_diffusion(_weight_2d(module), g, h, None, order=st.order, damp=st.damp, overwrite_gram=True).weight
        with torch.no_grad():
            module.weight.copy_(new.reshape(module.weight.shape).to(module.weight.dtype))


@register_method
class AttentionRound(Method):
    """Attention Round (:mod:`numcast.algorithms.attention_round`). ``objective="block"`` (default, the paper's
    reconstruction, :func:`~numcast.algorithms.attention_round.round_block`): the offsets of all layers of a
    block are learned together so that the block, run on the quantized stream's inputs with the soft weights,
    reproduces the float block's outputs on the float stream. ``objective="layer"``: each layer alone, on its
    output error through its input Gram matrix (cheaper; no second stream)."""

    name = "attention-round"
    settings_field = "attention_round"

    def __init__(self, settings, accumulator=None, progress: bool = False) -> None:
        super().__init__(settings, accumulator, progress)
        self.solves_blocks = self.settings.objective == "block"
        self.needs_inputs = not self.solves_blocks
        self.needs_float_inputs = self.solves_blocks

    def _optimise_kwargs(self) -> dict:
        st = self.settings
        return dict(iterations=st.iterations, lr=st.lr, sigma_start=st.sigma_start, sigma_end=st.sigma_end,
                    time_budget_s=st.time_budget_s, progress=self.progress)  # fmt: skip

    def statistics(self, module: nn.Module) -> HessianStatistics:
        return HessianStatistics()

    def solve(self, plan: LayerPlan, stats: HessianStatistics) -> QTensor:
        st = self.settings
        w = _weight_2d(plan.module)
        return attention_round(w, plan.weight_format, layer_output_loss(w, stats.result()), k_nearest=st.k_nearest,
                               variant=st.variant, seed=st.seed, **self._optimise_kwargs()).qtensor  # fmt: skip

    def solve_block(self, block, plans, names, inputs, targets, masks=None) -> dict[str, QTensor]:
        """Each step a mini-batch of ``batch_size`` samples drawn from all the cached calibration samples (seeded).
        Under torch.distributed each rank draws from its own share and the offsets' gradients are averaged over
        the ranks every step (DDP, :mod:`numcast.pipeline.distributed`)."""
        st = self.settings
        layers = [(names[p.name], p.module, get_format(p.weight_format)) for p in plans]
        ddp = dict(reduce_grads=distributed.average_gradients, stop_together=distributed.any_rank)
        got = round_block(block, layers, inputs, targets, k_nearest=st.k_nearest, variant=st.variant, seed=st.seed,
                          batch_size=st.batch_size, masks=masks, **(ddp if distributed.active() else {}),
                          **self._optimise_kwargs())  # fmt: skip
        return {p.name: got[names[p.name]] for p in plans}


@register_method
class EPInit(Method):
    """A2Q+'s EP-init as a PTQ method (:func:`numcast.pipeline.accumulator.ep_init_qweight`): the layer's float
    weights and its accumulator budget are enough, no calibration statistics."""

    name = "ep-init"
    needs_calibration = False
    needs_accumulator_bits = True

    def solve(self, plan: LayerPlan, stats=None) -> QTensor:
        return ep_init_qweight(plan, self.accumulator)
