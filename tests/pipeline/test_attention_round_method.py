"""Attention Round through the pipeline: the recipe's and the CLI's ``batch_size``, and the steps of the block
reconstruction run on mini-batches of that many samples whatever the size of the calibration set (a step's cost
does not grow with it), on the format's grid."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from numcast.cli import build_parser, recipe_from_args
from numcast.formats.engine import grid_cast
from numcast.formats.registry import get_format
from numcast.pipeline.recipe import Recipe
from numcast.pipeline.runner import quantize_blockwise


def test_batch_size_in_the_recipe_and_on_the_command_line():
    from numcast.algorithms.attention_round import DEFAULT_BATCH_SIZE

    assert Recipe(weights="int4_channel", method="attention-round").attention_round.batch_size == DEFAULT_BATCH_SIZE
    args = build_parser().parse_args(["quantize", "mobilenet-v2", "--weights", "int4_channel", "--method",
                                      "attention-round", "--ar-batch-size", "12", "--out", "o"])  # fmt: skip
    assert recipe_from_args(args).attention_round.batch_size == 12
    assert Recipe(weights="int4_channel", attention_round={"batch_size": None}).attention_round.batch_size is None
    with pytest.raises(ValidationError, match="batch_size"):
        Recipe(weights="int4_channel", attention_round={"batch_size": 0})


def cnn() -> tuple[nn.Module, list[nn.Module]]:
    """Two conv-BN-ReLU blocks (eval-mode batch norm, folded into the convolutions during the steps)."""
    g = torch.Generator().manual_seed(0)
    blocks = [nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()),
              nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU())]  # fmt: skip
    model = nn.Sequential(*blocks)
    with torch.no_grad():
        for m in model.modules():
            for p in m.parameters(recurse=False):
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.copy_(torch.rand(8, generator=g) + 0.5)
    return model.eval(), blocks


@pytest.mark.parametrize("n_batches", [2, 6])
@pytest.mark.parametrize("batch_size", [4, None])
def test_each_step_runs_batch_size_samples_whatever_the_calibration_set(n_batches, batch_size):
    model, blocks = cnn()
    twin, _ = cnn()
    data = [torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(i)) for i in range(n_batches)]
    seen: list[tuple[int, bool]] = []
    for b in blocks:  # the ReLU is called by the block and by its folded trace alike
        b[2].register_forward_pre_hook(lambda _m, a: seen.append((a[0].shape[0], torch.is_grad_enabled())))
    recipe = Recipe(weights="int4_channel", method="attention-round", calibration=8 * n_batches,
                    attention_round={"iterations": 5, "batch_size": batch_size})  # fmt: skip
    res = quantize_blockwise(model, blocks, data, recipe, progress=False, first_block_input="model")
    steps = [n for n, grad in seen if grad]
    assert steps == [batch_size or 8] * 10  # 5 steps per block, 2 blocks
    by = {r.name: r for r in res.layers}
    assert by["0.0"].method == by["1.0"].method == "attention-round"
    for name, float_conv in (("0.0", twin[0][0]), ("1.0", twin[1][0])):  # on the grid, with the same scales
        w = model.get_submodule(name).weight
        fmt = get_format("int4_channel")
        w2 = float_conv.weight.detach().reshape(8, -1)
        again = grid_cast(w.reshape(8, -1), fmt, scales=grid_cast(w2, fmt).scales).output(w2.shape, torch.float32)
        assert torch.equal(again, w.reshape(8, -1))
