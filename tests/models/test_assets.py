"""The shipped MobileNetV2 weights load through the real loading code, and a missing package is named."""

from __future__ import annotations

import pytest
import torch

from numcast.models import assets


def test_mobilenet_v2_state_dict_is_the_imagenet_checkpoint():
    sd = assets.mobilenet_v2_state_dict()
    assert sd["classifier.1.weight"].shape == (1000, 1280)
    assert sd["features.0.0.weight"].shape == (32, 3, 3, 3)
    n = sum(v.numel() for k, v in sd.items() if not k.endswith("num_batches_tracked") and "running" not in k)
    assert n == 3_504_872  # torchvision's MobileNetV2 parameter count
    assert all(v.dtype == torch.float32 for k, v in sd.items() if v.is_floating_point())


def test_missing_package_error_carries_the_install_command():
    with pytest.raises(assets.MissingAssetError, match="pip install --no-deps numcast-no-such-pkg"):
        assets.package_dir("numcast_no_such_pkg", "numcast-no-such-pkg", "pip install --no-deps numcast-no-such-pkg")
