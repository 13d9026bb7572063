"""quantize_data_free: every parameter-holding module is reported, recipes are honoured, outputs are exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_bitwise
from torch import nn

from numcast.formats.ops import cast
from numcast.nn import QuantConv2d, QuantEmbedding, QuantLinear
from numcast.pipeline.data_free import quantize_data_free
from numcast.pipeline.recipe import Recipe


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 32)
        self.conv = nn.Conv2d(3, 8, 3)
        self.vol = nn.Conv3d(2, 2, 1)
        self.norm = nn.LayerNorm(32)
        self.body = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
        self.lm_head = nn.Linear(32, 20, bias=False)

    def forward(self, ids):
        h = self.norm(self.embed(ids))
        return self.lm_head(self.body(h))


def test_every_module_with_parameters_is_reported():
    with pytest.warns(UserWarning, match="vol"):
        res = quantize_data_free(Tiny(), Recipe(weights="mxfp4"))
    owners = {n for n, m in Tiny().named_modules() if any(True for _ in m.parameters(recurse=False))}
    assert {r.name for r in res.layers} == owners
    by = {r.name: r for r in res.layers}
    assert by["body.0"].action == "quantized" and by["body.0"].weight_format == "mxfp4"
    assert "LM head" in by["lm_head"].reason and "embeddings" in by["embed"].reason
    assert "float" in by["norm"].reason and "not supported" in by["vol"].reason
    assert isinstance(res.model.body[0], QuantLinear) and isinstance(res.model.conv, QuantConv2d)
    assert isinstance(res.model.lm_head, nn.Linear)


def test_opt_in_embeddings_lm_head_overrides_and_exactness():
    model = Tiny()
    recipe = Recipe(
        weights="int4_g32",
        activations="mxfp8_e4m3",
        quantize_embeddings=True,
        quantize_lm_head=True,
        overrides=[{"pattern": "body.2", "weights": "nvfp4"}],
    )
    with pytest.warns(UserWarning):
        res = quantize_data_free(model, recipe)
    q = res.model
    assert isinstance(q.embed, QuantEmbedding) and isinstance(q.lm_head, QuantLinear)
    assert q.body[2].weight_format.name == "nvfp4"
    assert isinstance(model.body[0], nn.Linear)  # the caller's model is untouched (not inplace)
    ids = torch.tensor([[1, 5, 7]])
    h = model.norm(F.embedding(ids, cast(model.embed.weight.detach(), "int4_g32")))
    lin = lambda x, layer, f: F.linear(cast(x, "mxfp8_e4m3"), cast(layer.weight.detach(), f), layer.bias)  # noqa: E731
    h = lin(torch.relu(lin(h, model.body[0], "int4_g32")), model.body[2], "nvfp4")
    ref = F.linear(cast(h, "mxfp8_e4m3"), cast(model.lm_head.weight.detach(), "int4_g32"))
    with torch.no_grad():
        assert_bitwise(q(ids), ref.detach(), "tiny model")


def test_static_activations_need_calibration_and_get_calibrated():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    recipe = Recipe(weights="int8_channel", activations="int8_tensor", activation_mode="static")
    with pytest.raises(ValueError, match="calibration data"):
        quantize_data_free(model, recipe)
    data = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    res = quantize_data_free(model, recipe, calibration=data)
    first = res.model[0].input_quant
    assert float(first.amax) == float(torch.cat(data).abs().max())
    assert res.model(data[0]).shape == (8, 4)


def test_gptq_is_refused_here_with_the_reason():
    with pytest.raises(ValueError, match="calibration pipeline"):
        quantize_data_free(nn.Linear(4, 4), Recipe(weights="mxfp4", method="gptq"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_weight_is_refused_naming_the_layer_and_count(bad):
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        model[2].weight[1, 3] = bad
        model[2].weight[5, 0] = bad
    with pytest.raises(ValueError, match=r"^2: 2 weight\(s\) are NaN or inf"):
        quantize_data_free(model, Recipe(weights="mxfp4"))
    first = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match=r"^2: 2 weight\(s\) are NaN or inf"):  # layer 0 passed, layer 2 did not:
        quantize_data_free(model, Recipe(weights="mxfp4"), inplace=True)  # nothing is installed
    assert type(model[0]) is nn.Linear and torch.equal(model[0].weight, first)
    with torch.no_grad():
        model[2].weight.nan_to_num_(0.0, 0.0, 0.0)
    layers = quantize_data_free(model, Recipe(weights="mxfp4")).layers
    assert {r.name for r in layers if r.action == "quantized"} == {"0", "2"}
