"""numcast's Fashion-MNIST classifier: a small ResNet-style CNN (:class:`FmnistCNN`), its blocks for block-wise
quantization, and its trained checkpoint, which ships inside the package (``weights/fmnist-cnn-v1.safetensors``,
1.3 MB) so every machine quantizes the same model. :func:`numcast.training.fmnist.train_fmnist_cnn` is the
deterministic recipe that produced it (``python -m numcast.training.fmnist OUT`` writes a new one).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from numcast.io import write_atomic

FMNIST_CNN_FORMAT = "numcast.fmnist-cnn.v1"  # the ``format`` metadata entry of a checkpoint file
FMNIST_CNN_CHECKPOINT = Path(__file__).parent / "weights" / "fmnist-cnn-v1.safetensors"


class BasicBlock(nn.Module):
    """ResNet basic block: ``relu2(bn2(conv2(relu1(bn1(conv1(x))))) + shortcut(x))``.

    ``[B, cin, H, W] -> [B, cout, ceil(H / stride), ceil(W / stride)]``; the shortcut is the identity, or a
    1x1 convolution + batch norm when the stride or the channel count changes.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        if stride != 1 or cin != cout:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(y)) + self.shortcut(x))


class FmnistHead(nn.Module):
    """Global average pool, flatten and the classifier: ``[B, C, H, W] -> [B, num_classes]`` logits."""

    def __init__(self, cin: int, num_classes: int = 10) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(x)))


class FmnistCNN(nn.Module):
    """Small ResNet for ``[B, 1, 28, 28]`` normalised Fashion-MNIST images -> ``[B, 10]`` logits.

    - ``stem``: conv 3x3 1->32 stride 2 + BN + ReLU (28x28 -> 14x14);
    - ``stages`` (an ``nn.Sequential`` of :class:`BasicBlock`): two blocks at 32 channels (14x14), one block
      32->64 stride 2 (7x7), one block 64->128 stride 2 (4x4); the downsampling blocks have 1x1 conv shortcuts;
    - ``head`` (:class:`FmnistHead`): global average pool + flatten + Linear(128, 10).

    ``forward(x) = head(stages(stem(x)))``; :func:`fmnist_blocks` lists the blocks. The stride-2 stem keeps an
    epoch on 2 CPU threads well under a minute (a stride-1 stem is about 4x slower); every conv except the stem
    and the head's Linear has a reduction length (``cin * kh * kw`` or ``cin``) that is a multiple of 32, so
    block formats (MX block 32, NVFP4 block 16) tile them exactly. 326_634 parameters.
    """

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 128), num_classes: int = 10) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.stem = nn.Sequential(nn.Conv2d(1, w1, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w1), nn.ReLU())
        self.stages = nn.Sequential(
            BasicBlock(w1, w1), BasicBlock(w1, w1), BasicBlock(w1, w2, stride=2), BasicBlock(w2, w3, stride=2)
        )
        self.head = FmnistHead(w3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


def fmnist_blocks(model: FmnistCNN) -> list[nn.Module]:
    """``[stem, block1, ..., blockN, head]``: applying them in order equals ``model(x)`` exactly."""
    return [model.stem, *model.stages, model.head]


def save_fmnist_cnn(model: FmnistCNN, path: Path, metadata: dict[str, str]) -> None:
    """Write ``model``'s state dict with ``metadata`` to ``path`` atomically (an interrupted write leaves nothing
    behind, :func:`numcast.io.write_atomic`)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": FMNIST_CNN_FORMAT, **metadata}))


def load_fmnist_cnn(path: Path | str | None = None) -> FmnistCNN:
    """The trained :class:`FmnistCNN` in eval mode, from ``path`` (default: the checkpoint shipped with numcast,
    :data:`FMNIST_CNN_CHECKPOINT`). A missing, corrupt or foreign file raises an error naming it."""
    from safetensors import safe_open

    path = Path(path) if path is not None else FMNIST_CNN_CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no FmnistCNN checkpoint (python -m numcast.training.fmnist PATH trains one)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises SafetensorError (and OSError) on a truncated/garbled file
        raise ValueError(f"{path}: corrupt FmnistCNN checkpoint ({e})") from e
    if meta.get("format") != FMNIST_CNN_FORMAT:
        raise ValueError(f"{path}: not an FmnistCNN checkpoint (format {meta.get('format')!r})")
    with torch.random.fork_rng(devices=[]):  # the module constructors draw from the global RNG
        model = FmnistCNN()
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: corrupt FmnistCNN checkpoint ({e})") from e
    return model.eval()
