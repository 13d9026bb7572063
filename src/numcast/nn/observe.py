"""What reaches a layer: the range (and optionally the tensors) of the first input of chosen modules while a
model runs. Used to decide input signs (unsigned after ReLUs) and to replay real inputs."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
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
