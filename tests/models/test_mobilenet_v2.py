"""MobileNetV2 matches torchvision's layout, loads the ImageNet checkpoint strictly and classifies real photos."""

from __future__ import annotations

import pytest
import torch
from helpers import STANDARD_PHOTOS, standard_crops
from torch import nn

from numcast.models import assets
from numcast.models.mobilenet_v2 import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INPUT_SIZE,
    MobileNetV2,
    load_mobilenet_v2,
    mobilenet_v2_blocks,
)


@pytest.fixture(scope="module")
def model() -> MobileNetV2:
    return load_mobilenet_v2()


@pytest.fixture(scope="module")
def crops() -> torch.Tensor:
    return standard_crops(STANDARD_PHOTOS, INPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD)


@pytest.fixture(scope="module")
def logits(model, crops) -> torch.Tensor:
    with torch.no_grad():
        return model(crops)


def test_state_dict_names_match_the_torchvision_checkpoint(model):
    sd = assets.mobilenet_v2_state_dict()
    assert set(model.state_dict()) == set(sd)
    for name in (
        "features.0.0.weight",
        "features.0.1.running_mean",
        "features.1.conv.0.0.weight",
        "features.2.conv.3.running_var",
        "features.18.0.weight",
        "classifier.1.weight",
        "classifier.1.bias",
    ):
        assert torch.equal(model.state_dict()[name], sd[name]), name
    assert MobileNetV2().load_state_dict(sd, strict=True) is not None
    assert sum(p.numel() for p in model.parameters()) == 3_504_872
    assert not model.training and all(p.dtype == torch.float32 for p in model.parameters())
    assert len(model.features) == 19 and isinstance(model.classifier[1], nn.Linear)
    assert model.classifier[0].p == 0.2
    assert sum(isinstance(m, nn.ReLU6) for m in model.modules()) == 35  # 1 + 2 + 16 * 2 blocks' + 1 head


def test_predictions_on_real_photos(logits):
    top5 = logits.topk(5).indices.tolist()
    pred = dict(zip(STANDARD_PHOTOS, top5, strict=True))
    assert pred["chelsea"][0] in range(281, 286)  # a cat class (285 Egyptian cat)
    assert pred["coffee"][0] == 967  # espresso
    assert {968, 504} & set(pred["coffee"])  # cup / coffee mug also ranked
    assert pred["camera"][0] == 872  # tripod (the cameraman photo)
    assert pred["motorcycle"][0] == 665  # moped
    assert logits.softmax(-1)[STANDARD_PHOTOS.index("coffee"), 967] > 0.9


def test_blocks_in_order_equal_the_model(model, crops, logits):
    blocks = mobilenet_v2_blocks(model)
    assert len(blocks) == 20 and blocks[0] is model.features[0] and blocks[18] is model.features[18]
    x = crops[1:2]
    with torch.no_grad():
        for b in blocks:
            x = b(x)
        assert torch.equal(x, model(crops[1:2]))
    torch.testing.assert_close(x, logits[1:2])  # batch size changes the CPU kernels' rounding only


def test_head_shares_the_models_classifier():
    model = MobileNetV2().eval()
    head = mobilenet_v2_blocks(model)[-1]
    assert head.classifier is model.classifier
    assert [n for n, _ in head.named_parameters()] == ["classifier.1.weight", "classifier.1.bias"]
    head.classifier[1] = nn.Linear(1280, 10)  # a swap inside the shared Sequential is a swap in the model
    assert model.classifier[1] is head.classifier[1]
    head.classifier = nn.Sequential(nn.Linear(1280, 7))  # assigning the attribute on the stage reaches the model
    assert model.classifier is head.classifier
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 7)
