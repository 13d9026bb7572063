"""Weight solvers as the block-wise runner sees them: what statistics a layer needs, then the solve.

Each method turns a layer's calibration inputs into the statistics its algorithm needs (accumulated batch by
batch, so memory does not grow with the number of tokens) and calls the tensor-level algorithm in
``numcast.algorithms``. Convolutions are seen as matrix products: inputs unfolded to [tokens, C_in/g·Πk]
per group, weights viewed as [out, C_in/g·Πk].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from numcast.algorithms.gptq import gptq
from numcast.algorithms.rtn import rtn
from numcast.formats.qtensor import QTensor
from numcast.formats.spec import Format
from numcast.pipeline.recipe import Recipe


def layer_inputs_2d(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of its reduction axis: [groups, tokens, in/groups·Πk] (groups = 1 for Linear)."""
    if isinstance(module, nn.Linear):
        return x.reshape(1, -1, x.shape[-1])
    pre = getattr(module, "static_padding", None)
    if isinstance(pre, nn.Module):  # TF-style 'same' padding applied inside the layer's forward
        x = pre(x)
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)  # [N, C·kh·kw, L]
    elif isinstance(module, nn.Conv1d):
        cols = F.unfold(x.unsqueeze(-1), (module.kernel_size[0], 1), (module.dilation[0], 1),
                        (module.padding[0], 0), (module.stride[0], 1))  # fmt: skip
    else:
        raise TypeError(f"no input view for {type(module).__name__}")
    g = module.groups
    n, ck, L = cols.shape
    return cols.reshape(n, g, ck // g, L).permute(1, 0, 3, 2).reshape(g, n * L, ck // g)


class HessianAccumulator:
    """H = 2/n Σ xᵀx over calibration tokens, per group (float64)."""

    def __init__(self) -> None:
        self.h: torch.Tensor | None = None
        self.n = 0

    CHUNK = 1 << 24  # unfolded elements per step: a 3×3 conv on 112² maps unfolds 9× its input

    def add(self, module: nn.Module, x_quant: torch.Tensor, x_float: torch.Tensor | None = None) -> None:
        x = x_quant.detach()
        per_sample = max(1, x[0].numel() * (9 if x.dim() > 2 else 1))
        step = x.shape[0] if isinstance(module, nn.Linear) else max(1, self.CHUNK // per_sample)
        for i in range(0, x.shape[0], step):
            rows = layer_inputs_2d(module, x[i : i + step]).double()
            hb = rows.transpose(1, 2) @ rows
            self.h = hb if self.h is None else self.h + hb
            self.n += rows.shape[1]

    def result(self) -> torch.Tensor:
        if self.h is None or self.n == 0:
            raise ValueError("no calibration inputs reached this layer")
        return 2.0 * self.h / self.n


class Method:
    name = "base"
    needs_inputs = False
    needs_float_inputs = False

    def accumulator(self, module: nn.Module):
        return None

    def solve(self, module: nn.Module, fmt: Format, acc) -> QTensor:
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


def method_for(recipe: Recipe) -> Method:
    if recipe.method == "rtn":
        return RTN()
    if recipe.method == "gptq":
        return GPTQ(recipe.gptq.damp, recipe.gptq.block_size, recipe.gptq.act_order)
    raise ValueError(f"unknown method {recipe.method!r}")
