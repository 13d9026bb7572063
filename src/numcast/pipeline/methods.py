"""Weight solvers (RTN, GPTQ, Error Diffusion, EP-init, Attention Round) as the block-wise runner sees them:
statistics, then the solve.

Each method turns a layer's calibration inputs into the statistics its algorithm needs (accumulated batch by
batch, so memory does not grow with the number of tokens) and calls the tensor-level algorithm in
``numcast.algorithms``. Convolutions are seen as matrix products: inputs unfolded to [tokens, C_in/g·Πk]
per group, weights viewed as [out, C_in/g·Πk].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from numcast.algorithms.attention_round import AttentionRounder, attention_round, layer_output_loss, optimise
from numcast.algorithms.error_diffusion import error_diffusion
from numcast.algorithms.gptq import gptq
from numcast.algorithms.rtn import rtn
from numcast.formats.qtensor import QTensor
from numcast.formats.spec import Format
from numcast.nn.observe import layer_inputs_2d
from numcast.pipeline.recipe import Recipe


def _row_steps(module: nn.Module, x: torch.Tensor, chunk: int) -> tuple[range, int]:
    """(sample offsets, step) keeping one step's unfolded inputs near ``chunk`` elements (a 3×3 conv on 112²
    maps unfolds 9× its input); a Linear takes the whole batch."""
    per_sample = max(1, x[0].numel() * (9 if x.dim() > 2 else 1))
    step = x.shape[0] if isinstance(module, nn.Linear) else max(1, chunk // per_sample)
    return range(0, x.shape[0], step), step


class HessianAccumulator:
    """H = 2/n Σ xᵀx over calibration tokens, per group (float64)."""

    CHUNK = 1 << 24  # unfolded elements per step

    def __init__(self) -> None:
        self.h: torch.Tensor | None = None
        self.n = 0

    def add(self, module: nn.Module, x_quant: torch.Tensor, x_float: torch.Tensor | None = None) -> None:
        x = x_quant.detach()
        starts, step = _row_steps(module, x, self.CHUNK)
        for i in starts:
            rows = layer_inputs_2d(module, x[i : i + step]).double()
            hb = rows.transpose(1, 2) @ rows
            self.h = hb if self.h is None else self.h + hb
            self.n += rows.shape[1]

    def result(self) -> torch.Tensor:
        if self.h is None or self.n == 0:
            raise ValueError("no calibration inputs reached this layer")
        return 2.0 * self.h / self.n


class GramAccumulator:
    """Error Diffusion's statistics per group (float64): G = ÂᵀA and H = ÂᵀÂ over calibration tokens, Â the
    layer's inputs in the quantized network and A in the float network (the same tokens, in lock step)."""

    CHUNK = 1 << 23  # unfolded elements per step and stream

    def __init__(self) -> None:
        self.g: torch.Tensor | None = None
        self.h: torch.Tensor | None = None
        self.n = 0

    def add(self, module: nn.Module, x_quant: torch.Tensor, x_float: torch.Tensor | None) -> None:
        if x_float is None:
            raise RuntimeError("Error Diffusion needs the float stream's inputs of every layer it solves")
        xq, xf = x_quant.detach(), x_float.detach()
        if xq.shape != xf.shape:
            raise RuntimeError(f"float and quantized inputs differ in shape: {tuple(xf.shape)} vs {tuple(xq.shape)}")
        starts, step = _row_steps(module, xq, self.CHUNK)
        for i in starts:
            rq = layer_inputs_2d(module, xq[i : i + step]).double()
            rf = layer_inputs_2d(module, xf[i : i + step]).double()
            gb, hb = rq.transpose(1, 2) @ rf, rq.transpose(1, 2) @ rq
            self.g = gb if self.g is None else self.g + gb
            self.h = hb if self.h is None else self.h + hb
            self.n += rq.shape[1]

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.g is None or self.n == 0:
            raise ValueError("no calibration inputs reached this layer")
        return self.g / self.n, self.h / self.n


class Method:
    name = "base"
    needs_inputs = False
    needs_float_inputs = False
    progress = False  # show per-layer or per-block progress bars (set by the runner)

    def accumulator(self, module: nn.Module):
        return None

    def solve(self, module: nn.Module, fmt: Format, acc) -> QTensor:
        raise NotImplementedError

    def refits_float_layers(self, recipe: Recipe) -> bool:
        """Whether layers kept in float inside the blocks are re-fitted (then :meth:`refit_float` is called)."""
        return False

    def refit_float(self, module: nn.Module, acc) -> None:
        raise NotImplementedError


class RTN(Method):
    name = "rtn"

    def solve(self, module: nn.Module, fmt: Format, acc) -> QTensor:
        return rtn(module.weight, fmt)


class GPTQ(Method):
    name = "gptq"
    needs_inputs = True

    def __init__(self, damp: float = 0.01, block_size: int = 128, act_order: bool = False) -> None:
        self.damp, self.block_size, self.act_order = damp, block_size, act_order

    def accumulator(self, module: nn.Module) -> HessianAccumulator:
        return HessianAccumulator()

    def solve(self, module: nn.Module, fmt: Format, acc: HessianAccumulator) -> QTensor:
        w = module.weight.detach().reshape(module.weight.shape[0], -1)
        res = gptq(w, acc.result(), fmt, damp=self.damp, block_size=self.block_size, act_order=self.act_order)
        return res.qtensor


class ErrorDiffusion(Method):
    name = "error-diffusion"
    needs_inputs = True
    needs_float_inputs = True

    def __init__(self, scale_rule: str = "static", order: str = "strong-first") -> None:
        self.scale_rule, self.order = scale_rule, order

    def accumulator(self, module: nn.Module) -> GramAccumulator:
        return GramAccumulator()

    def solve(self, module: nn.Module, fmt: Format, acc: GramAccumulator) -> QTensor:
        w = module.weight.detach().reshape(module.weight.shape[0], -1)
        g, h = acc.result()
        return error_diffusion(w, g, h, fmt, scale_rule=self.scale_rule, order=self.order).qtensor

    def refits_float_layers(self, recipe: Recipe) -> bool:
        return recipe.error_diffusion.calibrate_float_layers

    def refit_float(self, module: nn.Module, acc: GramAccumulator) -> None:
        """Layer calibration: the same diffusion with Q = identity; the float weight is replaced in place."""
        w = module.weight.detach().reshape(module.weight.shape[0], -1)
        g, h = acc.result()
        new = error_diffusion(w, g, h, None, order=self.order).weight
        with torch.no_grad():
            module.weight.copy_(new.reshape(module.weight.shape).to(module.weight.dtype))


class AttentionRound(Method):
    """Attention Round (:mod:`numcast.algorithms.attention_round`). ``objective="block"`` (default, the paper's
    reconstruction): the offsets of all layers of a block are learned together so that the block, run on the
    quantized stream's inputs with the soft weights, reproduces the float block's outputs on the float
    stream (MSE), one calibration batch per step. ``objective="layer"``: each layer alone, on its output error
    through its input Gram matrix (cheaper; no second stream)."""

    name = "attention-round"

    def __init__(self, settings) -> None:
        self.settings = settings
        self.block_level = settings.objective == "block"
        self.needs_inputs = not self.block_level
        self.needs_float_inputs = self.block_level

    def _kwargs(self) -> dict:
        st = self.settings
        return dict(iterations=st.iterations, lr=st.lr, sigma_start=st.sigma_start, sigma_end=st.sigma_end,
                    time_budget_s=st.time_budget_s, progress=self.progress)  # fmt: skip

    def accumulator(self, module: nn.Module) -> HessianAccumulator:
        return HessianAccumulator()

    def solve(self, module: nn.Module, fmt: Format, acc: HessianAccumulator) -> QTensor:
        st = self.settings
        w = module.weight.detach().reshape(module.weight.shape[0], -1)
        return attention_round(w, fmt, layer_output_loss(w, acc.result()), k_nearest=st.k_nearest,
                               variant=st.variant, seed=st.seed, **self._kwargs()).qtensor  # fmt: skip

    def solve_block(self, named: list[tuple[str, nn.Module, Format]], run, targets: list) -> dict[int, QTensor]:
        """``named``: (name in the block, layer, format); ``run(i, params)`` the block's output on calibration
        batch i with ``params`` (name → weight) substituted; ``targets[i]`` the float block's output."""
        st = self.settings
        rounders = []
        for name, mod, fmt in named:
            w = mod.weight.detach().reshape(mod.weight.shape[0], -1)
            key = f"{name}.weight" if name else "weight"
            rounders.append((key, mod, AttentionRounder(w, fmt, st.k_nearest, st.variant, st.seed)))

        def step_loss(it: int, sigma: float) -> torch.Tensor:
            i = it % len(targets)
            params = {key: r.soft(sigma).reshape(mod.weight.shape).to(mod.weight.dtype) for key, mod, r in rounders}
            out = run(i, params)
            return F.mse_loss(out.float(), targets[i].to(out.device).float())

        optimise([r for _, _, r in rounders], step_loss, **self._kwargs())
        return {id(mod): r.qtensor() for _, mod, r in rounders}


class EPInit(Method):
    """A2Q+'s EP-init as a PTQ method: no calibration statistics, the layer's float weights and its accumulator
    budget are enough, so :meth:`solve` returns None and :func:`numcast.pipeline.accumulator.layer_qweight`
    does the work (it needs the layer's input format, which the runner knows)."""

    name = "ep-init"

    def solve(self, module: nn.Module, fmt: Format, acc) -> None:
        return None


def method_for(recipe: Recipe) -> Method:
    if recipe.method == "rtn":
        return RTN()
    if recipe.method == "gptq":
        return GPTQ(recipe.gptq.damp, recipe.gptq.block_size, recipe.gptq.act_order)
    if recipe.method == "error-diffusion":
        return ErrorDiffusion(recipe.error_diffusion.scale_rule, recipe.error_diffusion.order)
    if recipe.method == "ep-init":
        return EPInit()
    if recipe.method == "attention-round":
        return AttentionRound(recipe.attention_round)
    raise ValueError(f"unknown method {recipe.method!r}")
