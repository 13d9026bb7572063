"""What reaches a layer: the range (and optionally the tensors) of the first input of chosen modules while a
model runs (used to decide input signs, unsigned after ReLUs, and to replay real inputs); ``call_model`` runs
one calibration batch; ``layer_inputs_2d`` views a layer's input as the rows its dot products read."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class InputStats:
    """``low``: the smallest input value seen; ``amax``: the largest magnitude; ``seen``: the inputs (CPU), when
    kept."""

    low: float = math.inf
    amax: float = 0.0
    seen: list[torch.Tensor] = field(default_factory=list)

    @property
    def nonnegative(self) -> bool:
        return self.low >= 0


def call_model(model: nn.Module, batch) -> object:
    """Run ``model`` on one calibration batch: a tensor, a tuple of arguments, or a mapping of keyword arguments
    (a dict, a tokenizer's ``BatchEncoding``)."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


@torch.no_grad()
def observe_inputs(modules: dict[str, nn.Module], run: Callable[[], None], keep: bool = False) -> dict[str, InputStats]:
    """Call ``run()`` (which drives the forward passes) with a pre-hook on each of ``modules`` (name → module)
    recording its first input's range (and the input itself with ``keep``); the hooks are removed afterwards."""
    stats = {n: InputStats() for n in modules}
    handles = []
    for n, m in modules.items():

        def hook(_m, args, s=stats[n]):
            x = args[0].detach()
            s.low = min(s.low, float(x.min()))
            s.amax = max(s.amax, float(x.abs().max()))
            if keep:
                s.seen.append(x.cpu())

        handles.append(m.register_forward_pre_hook(hook))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return stats


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
