"""observe_inputs: ranges of what reaches each chosen module, hooks removed afterwards."""

from __future__ import annotations

import torch
from torch import nn

from numcast.nn.observe import observe_inputs


def test_ranges_inputs_and_hook_removal():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    xs = [torch.randn(3, 4, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    mods = {"first": model[0], "second": model[2]}
    stats = observe_inputs(mods, lambda: [model(x) for x in xs], keep=True)
    assert stats["first"].low == float(torch.cat(xs).min()) and stats["first"].amax == float(torch.cat(xs).abs().max())
    assert not stats["first"].nonnegative and stats["second"].nonnegative  # after the ReLU
    assert torch.equal(torch.cat(stats["first"].seen), torch.cat(xs))
    assert not model[0]._forward_pre_hooks and not model[2]._forward_pre_hooks
