"""MobileNetV2 (width 1.0) with torchvision's module layout and parameter names, and its ImageNet weights.

torchvision itself is not installed (its PyPI wheel is a CUDA build, see ../shared/design/assets.md), so the
architecture is defined here; ``torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1")`` checkpoints load
with ``strict=True``. Preprocessing: resize the shorter side to 256, centre crop :data:`INPUT_SIZE`, scale to
[0, 1], normalise with :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD` (``numcast.models.data.image_crops``).

Module structure (for block-wise quantization, see :func:`mobilenet_v2_blocks`):
``features`` = Sequential of 19 stages: ``features.0`` stem Conv-BN-ReLU6 (3→32, stride 2), ``features.1``–
``features.17`` :class:`InvertedResidual` blocks, ``features.18`` Conv-BN-ReLU6 1x1 (320→1280);
``classifier`` = Sequential(Dropout(0.2), Linear(1280, 1000)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from numcast.models.assets import mobilenet_v2_state_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_SIZE = 224
RESIZE_SIZE = 256
NUM_CLASSES = 1000
NUM_PARAMETERS = 3_504_872

# (expand ratio t, output channels c, repeats n, stride of the first repeat s), torchvision's table.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class ConvBNReLU6(nn.Sequential):
    """``0``: Conv2d (no bias, padding ``(k-1)//2``), ``1``: BatchNorm2d, ``2``: ReLU6 (torchvision's
    ``Conv2dNormActivation``). ReLU6 is not in-place, so hooks on the conv/BN outputs see unclipped values."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(),
        )


class InvertedResidual(nn.Module):
    """Expand 1x1 (absent when ``t == 1``) → depthwise 3x3 (stride ``s``) → linear 1x1 projection + BN,
    plus the input when ``stride == 1`` and ``cin == cout``. Submodules live in ``self.conv`` (Sequential)."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = cin * expand_ratio
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(cin, hidden, kernel_size=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2, width multiplier 1.0: ``[N, 3, H, W]`` normalised images → ``[N, 1000]`` logits."""

    def __init__(self, num_classes: int = NUM_CLASSES, dropout: float = 0.2) -> None:
        super().__init__()
        cin, last = 32, 1280
        features: list[nn.Module] = [ConvBNReLU6(3, cin, stride=2)]
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            for i in range(n):
                features.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        features.append(ConvBNReLU6(cin, last, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class SharedModuleView(nn.Module):
    """Base for glue stages that reuse a model's own submodules (no copies).

    ``names`` are attributes of ``owner`` registered here under the same names, so ``named_modules()`` of the
    stage finds the model's layers and hooks on them fire in both. Assigning one of these names on the stage
    (``stage.fc = QuantLinear(...)``) also assigns it on ``owner``; swapping a layer inside a shared submodule
    (``stage.classifier[1] = ...``) changes both because it is the same object. ``owner`` itself is not
    registered (``stage.parameters()`` holds only the shared submodules' parameters).
    """

    def __init__(self, owner: nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        object.__setattr__(self, "_owner", owner)
        object.__setattr__(self, "_shared_names", tuple(names))
        for name in names:
            super().__setattr__(name, getattr(owner, name))

    def __setattr__(self, name: str, value: object) -> None:
        if name in self.__dict__.get("_shared_names", ()):
            setattr(self._owner, name, value)
        super().__setattr__(name, value)


class MobileNetV2Head(SharedModuleView):
    """Global average pool → flatten → ``classifier``, sharing the model's own ``classifier`` Sequential (see
    :class:`SharedModuleView`): ``[N, 1280, h, w]`` → ``[N, 1000]`` logits."""

    def __init__(self, model: MobileNetV2) -> None:
        super().__init__(model, ("classifier",))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def mobilenet_v2_blocks(model: MobileNetV2) -> list[nn.Module]:
    """``[features[0], ..., features[18], MobileNetV2Head(model)]``: applied in order they compute ``model(x)``.

    The stages are the model's own submodules (not copies), so quantizing a layer inside one changes the model.
    """
    return [*model.features, MobileNetV2Head(model)]


def load_mobilenet_v2() -> MobileNetV2:
    """torchvision's IMAGENET1K_V1 MobileNetV2 (71.9 % top-1), float32, eval mode, on the CPU.

    Weights come from ``numcast.models.assets.mobilenet_v2_state_dict()`` and load with ``strict=True``;
    a missing weight package raises ``MissingAssetError`` with its install command.
    """
    model = MobileNetV2()
    model.load_state_dict(mobilenet_v2_state_dict(), strict=True)
    return model.float().eval()
