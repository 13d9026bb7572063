"""Layers stored in a form numcast does not quantize directly, turned into equivalent standard modules first
(same outputs, same state-dict names where possible):

- transformers' ``Conv1D`` (GPT-2; weight stored ``[in, out]``, ``y = x W + b``) → ``nn.Linear`` with the
  transposed weight, so its blocks run along the reduction axis like any Linear.
- Fused mixture-of-experts tensors (transformers' ``MixtralExperts`` / ``Qwen2MoeExperts`` ...: ``gate_up_proj``
  ``[E, 2I, H]``, ``down_proj`` ``[E, H, I]``, concatenated gate/up, no bias) → :class:`UnfusedExperts`, one
  ``nn.Linear`` pair per expert with the eager forward of transformers (route, gate·up, down, weight, add), so
  every expert is a layer the methods solve on the tokens routed to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from numcast.nn.surgery import set_module


def is_conv1d(m: nn.Module) -> bool:
    """transformers' ``Conv1D`` (matched by name and shape, so transformers need not be imported)."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None


def is_fused_experts(m: nn.Module) -> bool:
    w = getattr(m, "gate_up_proj", None)
    d = getattr(m, "down_proj", None)
    return isinstance(w, torch.Tensor) and isinstance(d, torch.Tensor) and w.dim() == 3 and d.dim() == 3


def linear_from_conv1d(conv: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` computing what ``conv`` (a transformers Conv1D) computes."""
    n_in, n_out = conv.weight.shape
    lin = skip_init(nn.Linear, n_in, n_out, bias=conv.bias is not None, device=conv.weight.device,
                    dtype=conv.weight.dtype)  # fmt: skip
    with torch.no_grad():
        lin.weight.copy_(conv.weight.detach().t())
        if conv.bias is not None:
            lin.bias.copy_(conv.bias.detach())
    return lin


class UnfusedExperts(nn.Module):
    """Fused experts as ``gate_up[e]: Linear(H, 2I)`` and ``down[e]: Linear(I, H)`` per expert; ``forward(
    hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`` as transformers' eager loop."""

    def __init__(self, fused: nn.Module) -> None:
        super().__init__()
        flags = {k: getattr(fused, k, d) for k, d in (("is_concatenated", True), ("is_transposed", False),
                                                       ("has_bias", False), ("has_gate", True))}  # fmt: skip
        if flags != {"is_concatenated": True, "is_transposed": False, "has_bias": False, "has_gate": True}:
            raise ValueError(f"{type(fused).__name__}: fused experts with layout {flags} are not supported yet "
                             "(numcast unfuses concatenated gate/up experts without bias)")  # fmt: skip
        e, two_i, h = fused.gate_up_proj.shape
        self.num_experts = e
        self.act_fn = fused.act_fn
        kw = {"bias": False, "device": fused.gate_up_proj.device, "dtype": fused.gate_up_proj.dtype}
        self.gate_up = nn.ModuleList(skip_init(nn.Linear, h, two_i, **kw) for _ in range(e))
        self.down = nn.ModuleList(skip_init(nn.Linear, two_i // 2, h, **kw) for _ in range(e))
        with torch.no_grad():
            for k in range(e):
                self.gate_up[k].weight.copy_(fused.gate_up_proj[k])
                self.down[k].weight.copy_(fused.down_proj[k])

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for (k,) in hit.tolist():
            if k == self.num_experts:
                continue
            pos, token = torch.where(mask[k])
            gate, up = self.gate_up[k](hidden_states[token]).chunk(2, dim=-1)
            y = self.down[k](self.act_fn(gate) * up) * top_k_weights[token, pos, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def make_quantizable(model: nn.Module) -> list[str]:
    """Replace every transformers Conv1D and fused-experts module of ``model`` in place by its standard
    equivalent (module docstring); returns the names replaced. Idempotent."""
    done = []
    for name, m in list(model.named_modules()):
        if not name:
            continue
        if is_conv1d(m):
            set_module(model, name, linear_from_conv1d(m))
            done.append(name)
        elif is_fused_experts(m):
            set_module(model, name, UnfusedExperts(m))
            done.append(name)
    return done
