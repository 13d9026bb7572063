"""Block inputs through the model's own forward: code between blocks (a flatten, a residual added in the parent,
per-block arguments) runs as written, for both streams; models without it take the direct path."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_bitwise
from torch import nn

from numcast.algorithms.gptq import gptq
from numcast.pipeline.block_inputs import DIRECT, DIRECT_X, GLUE, Placement, probe_transitions
from numcast.pipeline.data_free import quantize_data_free
from numcast.pipeline.recipe import Recipe
from numcast.pipeline.runner import quantize_blockwise


def _init(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


class FlattenCNN(nn.Module):
    """The issue's example: ``x = self.conv_layers(x); x = x.view(x.size(0), -1); x = self.fc_layers(x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_layers = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2))
        self.fc_layers = nn.Sequential(nn.Linear(8 * 2 * 2, 32), nn.ReLU(), nn.Linear(32, 10))
        _init(self, 0)

    def forward(self, x):
        x = self.conv_layers(x)
        x = x.view(x.size(0), -1)
        return self.fc_layers(x)


class ParentResidual(nn.Module):
    """Residuals added in the parent, and a different ``scale`` argument per block."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Scaled(d) for _ in range(3)])
        _init(self, 1)

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = x + layer(x, scale=0.5 + i)
        return x


class Scaled(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x, scale=1.0):
        return scale * torch.tanh(self.fc(x))


class PerBlockArgs(nn.Module):
    """The previous block's output goes straight on, but each block gets its own ``scale`` (like Gemma3's
    alternating sliding-window masks)."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Scaled(d) for _ in range(3)])
        _init(self, 2)

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x, scale=torch.tensor(1.0 + i))
        return x


def images(n=3):
    return [torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(10 + i)) for i in range(n)]


def vectors(n=3, d=16):
    return [torch.randn(8, d, generator=torch.Generator().manual_seed(20 + i)) for i in range(n)]


def test_the_probe_tells_direct_glue_and_per_block_arguments_apart():
    p = Placement()
    cnn, res, args = FlattenCNN(), ParentResidual(), PerBlockArgs()
    assert probe_transitions(cnn, [cnn.conv_layers, cnn.fc_layers], images()[0], p) == ["first", GLUE]
    assert probe_transitions(res, list(res.layers), vectors()[0], p) == ["first", GLUE, GLUE]
    assert probe_transitions(args, list(args.layers), vectors()[0], p) == ["first", DIRECT_X, DIRECT_X]
    seq = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    assert probe_transitions(seq, [seq[0], seq[2]], vectors()[0], p) == ["first", GLUE]  # ReLU in between
    chain = nn.Sequential(nn.Sequential(nn.Linear(16, 16), nn.ReLU()), nn.Sequential(nn.Linear(16, 16)))
    assert probe_transitions(chain, list(chain), vectors()[0], p) == ["first", DIRECT]


@pytest.mark.parametrize("method", ["rtn", "gptq", "error-diffusion"])
def test_a_cnn_with_a_flatten_between_its_blocks_quantizes(method):
    model = FlattenCNN()
    ref = FlattenCNN()
    res = quantize_blockwise(model, [model.conv_layers, model.fc_layers], images(), Recipe(weights="int8_channel",
                             method=method), progress=False)  # fmt: skip
    assert len(res.quantized) == 4 and all(r.method.startswith(method) for r in res.quantized)
    x = images(1)[0]
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=0.05, rtol=0.05)
    if method == "rtn":
        rtn = quantize_data_free(FlattenCNN(), Recipe(weights="int8_channel"))
        for name in ("conv_layers.0", "fc_layers.0", "fc_layers.2"):
            assert_bitwise(model.get_submodule(name).weight, rtn.model.get_submodule(name).weight, name)


def test_gptq_sees_the_flattened_quantized_stream():
    """fc_layers.0's Hessian is built from the parent's flatten of the quantized conv stack's output."""
    model = FlattenCNN()
    data = images()
    quantize_blockwise(model, [model.conv_layers, model.fc_layers], data, Recipe(weights="int4_channel",
                       method="gptq"), progress=False)  # fmt: skip
    with torch.no_grad():
        x = torch.cat([model.conv_layers(b).flatten(1) for b in data]).double()
    h = 2 * x.T @ x / x.shape[0]
    want = gptq(FlattenCNN().fc_layers[0].weight.detach(), h, "int4_channel").qtensor.dequantize()
    assert_bitwise(model.fc_layers[0].qweight.dequantize(), want, "fc_layers.0")


@pytest.mark.parametrize("model_cls", [ParentResidual, PerBlockArgs])
def test_each_block_sees_what_the_parent_passes_it(model_cls):
    """GPTQ's Hessian of every block is that of the block's real input in the quantized model (residual sums and
    per-block arguments computed by the parent), checked against a forward of the finished model."""
    model = model_cls()
    data = vectors()
    quantize_blockwise(model, list(model.layers), data, Recipe(weights="int4_channel", method="gptq"),
                       progress=False)  # fmt: skip
    seen: dict[int, list] = {i: [] for i in range(3)}
    hooks = [layer.register_forward_pre_hook(lambda _m, a, i=i: seen[i].append(a[0])) for i, layer in
             enumerate(model.layers)]  # fmt: skip
    float_model = model_cls()
    with torch.no_grad():
        for b in data:
            model(b)
    for h in hooks:
        h.remove()
    # the last block was solved on the inputs the finished model gives it
    x = torch.cat(seen[2]).double()
    want = gptq(float_model.layers[2].fc.weight.detach(), 2 * x.T @ x / x.shape[0], "int4_channel").qtensor
    assert_bitwise(model.layers[2].fc.qweight.dequantize(), want.dequantize(), "layers.2.fc")


def test_the_direct_path_is_unchanged_for_chained_blocks():
    """Blocks that chain need no forward of the parent: quantizing them as a chain or with probing gives the
    same model (the shipped workloads' results are bit-identical, checked by benchmarks/ptq.py)."""
    chain = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(3)])
    _init(chain, 5)
    twin = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(3)])
    _init(twin, 5)
    a = quantize_blockwise(chain, list(chain), vectors(), Recipe(weights="int4_channel", method="gptq"),
                           progress=False)  # fmt: skip
    b = quantize_blockwise(twin, list(twin), vectors(), Recipe(weights="int4_channel", method="gptq"),
                           progress=False, first_block_input="model")  # fmt: skip
    for ra, rb in zip(a.quantized, b.quantized, strict=True):
        assert_bitwise(chain.get_submodule(ra.name).weight, twin.get_submodule(rb.name).weight, ra.name)
