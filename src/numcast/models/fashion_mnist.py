"""Fashion-MNIST: the data of numcast's fully offline classifier workload (the model is
:mod:`numcast.models.fmnist_cnn`).

The data comes from the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``, the
four gzip-compressed IDX files as published by Zalando Research); nothing is downloaded.
:func:`load_fashion_mnist` gives normalised images ``[N, 1, 28, 28]`` float32 and labels ``[N]`` int64.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from numcast.models.assets import MissingAssetError
from numcast.models.idx import read_idx

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_ENV = "NUMCAST_FASHION_MNIST_DIR"  # overrides FASHION_MNIST_DIR when set (read at every call)
FASHION_MNIST_INSTALL = "apt-get install dataset-fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_SIZES = {"train": 60_000, "test": 10_000}

# Per-pixel mean and (population, ddof=0) standard deviation of the 60000 training images after scaling the
# uint8 pixels to [0, 1], measured once in float64 over all 47_040_000 pixels: 0.2860405969887955 and
# 0.35302424451492254. Images are normalised as ``(pixels / 255 - MEAN) / STD``.
FASHION_MNIST_MEAN = 0.2860405969887955
FASHION_MNIST_STD = 0.35302424451492254


def fashion_mnist_dir() -> Path:
    """``$NUMCAST_FASHION_MNIST_DIR`` when set, else :data:`FASHION_MNIST_DIR`."""
    env = os.environ.get(FASHION_MNIST_ENV)
    return Path(env) if env else FASHION_MNIST_DIR


def load_fashion_mnist(
    split: Literal["train", "test"], data_dir: Path | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST ``split`` as ``(images, labels)``.

    ``images``: float32 ``[N, 1, 28, 28]``, ``(pixels / 255 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD`` (about
    mean 0 and std 1 on the train split); ``labels``: int64 ``[N]`` in 0..9 (0 T-shirt/top, 1 trouser, 2 pullover,
    3 dress, 4 coat, 5 sandal, 6 shirt, 7 sneaker, 8 bag, 9 ankle boot). N = 60000 (train) or 10000 (test), in
    file order. Files are read from ``data_dir``, else ``$NUMCAST_FASHION_MNIST_DIR``, else
    :data:`FASHION_MNIST_DIR`; the parsed uint8 arrays are cached per file, fresh tensors are returned each call.

    Raises :class:`~numcast.models.assets.MissingAssetError` (with the ``apt-get`` command) when a file is
    missing, and ``ValueError`` naming the file when one is corrupt.
    """
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    d = Path(data_dir) if data_dir is not None else fashion_mnist_dir()
    paths = [d / name for name in FASHION_MNIST_FILES[split]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise MissingAssetError(
            f"Fashion-MNIST file(s) not found: {', '.join(missing)}; install the Debian package with:\n"
            f"    {FASHION_MNIST_INSTALL}\n(or point ${FASHION_MNIST_ENV} at a directory holding the IDX files)"
        )
    img_path, lab_path = (str(p.resolve()) for p in paths)
    images = read_idx(img_path, 3, FASHION_MNIST_INSTALL)
    labels = read_idx(lab_path, 1, FASHION_MNIST_INSTALL)
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{img_path}: images are {images.shape[1:]}, expected 28x28; the file is corrupt")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{img_path} holds {images.shape[0]} images but {lab_path} holds {labels.shape[0]} labels")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{lab_path}: label {int(labels.max())} out of range 0..9; the file is corrupt")
    x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1)  # astype copies: the cached array stays intact
    x = (x / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    return x, torch.from_numpy(labels.astype(np.int64))


def grayscale_28(images: list[np.ndarray]) -> torch.Tensor:
    """The user's images as Fashion-MNIST inputs ``[N, 1, 28, 28]``: RGB averaged to gray, bilinear resize to
    28×28 (antialiased), scaled to [0, 1] and normalised like the training data."""
    import torch.nn.functional as F

    out = []
    for img in images:
        x = torch.from_numpy(np.ascontiguousarray(img)).float().div(255.0).mean(-1)[None, None]
        out.append(F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False, antialias=True))
    return (torch.cat(out) - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
