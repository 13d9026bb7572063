"""Finding a model's blocks (``blocks="auto"``): the units the block-wise runner solves one after another.

1. The repeated layers of a transformer: the largest ``nn.ModuleList`` (at least two entries) whose children
   all share one type (Llama/Qwen/Gemma/Phi/Mixtral ``model.layers``, BERT ``encoder.layer``, GPT-2
   ``transformer.h``, ViT ``encoder.layer``, ...).
2. Else the stages of a network: its children that hold parameters, a wrapper with one such child unwrapped, an
   ``nn.Sequential`` of containers expanded into its entries (torchvision's ``features``), kept when the
   model's forward calls them exactly once, in the order it calls them (one probe forward).
3. Else the whole model as one block.

Whatever is not inside a block (embeddings, final norm, LM head) is quantized by the runner as "outside the
blocks".
"""

from __future__ import annotations

import torch
from torch import nn

from numcast.nn.observe import call_model


def repeated_layers(model: nn.Module) -> list[nn.Module]:
    """The largest ``nn.ModuleList`` whose entries (parameter-holding, at least one) share one type, or []
    (module docstring, rule 1)."""
    best: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > len(best) and len({type(c) for c in m}) == 1 and \
                _holds_parameters(m):  # fmt: skip
            best = list(m)
    return best


def _holds_parameters(m: nn.Module) -> bool:
    return next(m.parameters(), None) is not None


def _stage_candidates(model: nn.Module) -> list[nn.Module]:
    """Rule 2's candidates, in registration order."""
    kids = [c for c in model.children() if _holds_parameters(c)]
    while len(kids) == 1 and any(_holds_parameters(g) for g in kids[0].children()):
        kids = [c for c in kids[0].children() if _holds_parameters(c)]
    out: list[nn.Module] = []
    for k in kids:
        inner = [c for c in k.children() if _holds_parameters(c)]
        if isinstance(k, nn.Sequential) and len(inner) >= 2 and all(any(True for _ in c.children()) for c in inner):
            out.extend(inner)  # a Sequential of stages: its entries are the stages
        else:
            out.append(k)
    return out


@torch.no_grad()
def find_blocks(model: nn.Module, batch) -> list[nn.Module]:
    """The model's blocks in execution order (module docstring); ``batch`` is one calibration input, used to
    see which candidate stages the forward calls, once each and in which order."""
    layers = repeated_layers(model)
    if layers:
        return layers
    candidates = _stage_candidates(model)
    if len(candidates) >= 2:
        order: list[nn.Module] = []
        count: dict[int, int] = {}

        def seen(m, _args):
            count[id(m)] = count.get(id(m), 0) + 1
            if m not in order:
                order.append(m)

        hooks = [c.register_forward_pre_hook(seen) for c in candidates]
        try:
            call_model(model, batch)
        finally:
            for h in hooks:
                h.remove()
        stages = [m for m in order if count[id(m)] == 1]
        if stages:
            return stages
    return [model]
