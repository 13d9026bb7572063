"""Fashion-MNIST and a small ResNet-style CNN trained on it: a real, fully offline model to quantize.

The data comes from the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``, the
four gzip-compressed IDX files as published by Zalando Research); nothing is downloaded. The CNN is trained
once on the CPU (deterministically, from a seed) and cached as safetensors under ``$NUMCAST_CACHE`` (default
``~/.cache/numcast``).

- :func:`load_fashion_mnist`: normalised images ``[N, 1, 28, 28]`` float32 and labels ``[N]`` int64.
- :class:`FmnistCNN`, :func:`fmnist_blocks`: the model and its sequential blocks for block-wise quantization.
- :func:`train_fmnist_cnn`, :func:`load_fmnist_cnn`: train (deterministic) / load from the cache.
- :func:`accuracy`: top-1 accuracy.

Default recipe (``train_fmnist_cnn()``): 3 epochs, batch 128, SGD (Nesterov momentum 0.9, weight decay 5e-4)
with a one-cycle learning-rate schedule peaking at 0.1, no augmentation, seed 0, channels-last during training.

Measured on this machine (2 CPU cores shared with other work, torch 2.13.0 CPU, 2 threads): the default model
(``load_fmnist_cnn()``, 3 epochs) reaches 92.16% top-1 on the 10000 test images; 469 steps per epoch take
about 35 s on idle cores (13.5 steps/s), 56 s with ``OMP_WAIT_POLICY=PASSIVE``, and 69-75 s with that policy
while another process kept one core busy (the cached model: 222 s of training in all). Beware: with the default
(active, spinning) OpenMP wait policy, 2 threads on 2 cores slow down about 25x as soon as another process
takes a core (1.7 s per step, 13 min per epoch); when the cores are shared, set ``OMP_WAIT_POLICY=PASSIVE``
before Python starts or train with ``threads=1`` (about 65 s per epoch idle; other bits, see DEFAULT_THREADS).
"""

from __future__ import annotations

import gzip
import math
import os
import tempfile
import time
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from numcast.models.assets import MissingAssetError, cache_root

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

FMNIST_CNN_CACHE_NAME = "fmnist-cnn-v1.safetensors"
FMNIST_CNN_FORMAT = "numcast.fmnist-cnn.v1"  # the ``format`` metadata entry of the cache file
DEFAULT_EPOCHS = 3
DEFAULT_SEED = 0
DEFAULT_BATCH_SIZE = 128
DEFAULT_LR = 0.1
# load_fmnist_cnn trains on this many threads whatever the machine has: CPU reductions split work by thread, so
# the trained bits depend on the thread count (1 vs 2 threads differ after a few steps).
DEFAULT_THREADS = 2

_IDX_UBYTE = 0x08  # IDX type code of unsigned bytes, the only element type Fashion-MNIST uses


# ---------------------------------------------------------------------------------------------------- data


def fashion_mnist_dir() -> Path:
    """``$NUMCAST_FASHION_MNIST_DIR`` when set, else :data:`FASHION_MNIST_DIR`."""
    env = os.environ.get(FASHION_MNIST_ENV)
    return Path(env) if env else FASHION_MNIST_DIR


@lru_cache(maxsize=8)
def _read_idx(path: str, ndim: int) -> np.ndarray:
    """The uint8 array stored in the gzip-compressed IDX file ``path`` (read-only; cached per path).

    IDX: two zero bytes, a type byte (0x08 = uint8), a byte with the number of dimensions, then one big-endian
    uint32 per dimension, then the data in C order. Anything else raises ``ValueError`` naming the file.
    """
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: not a readable gzip file ({e}); reinstall with: {FASHION_MNIST_INSTALL}") from e
    header = 4 + 4 * ndim
    if len(raw) < header or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE or raw[3] != ndim:
        raise ValueError(
            f"{path}: bad IDX magic number {raw[:4].hex() or '(empty)'} (expected 000008{ndim:02x}); "
            f"the file is corrupt, reinstall with: {FASHION_MNIST_INSTALL}"
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if len(raw) - header != math.prod(shape):
        raise ValueError(
            f"{path}: IDX header announces shape {shape} ({math.prod(shape)} bytes) but {len(raw) - header} data "
            f"bytes follow; the file is corrupt, reinstall with: {FASHION_MNIST_INSTALL}"
        )
    arr = np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)
    arr.flags.writeable = False
    return arr


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
    images = _read_idx(img_path, 3)
    labels = _read_idx(lab_path, 1)
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{img_path}: images are {images.shape[1:]}, expected 28x28; the file is corrupt")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{img_path} holds {images.shape[0]} images but {lab_path} holds {labels.shape[0]} labels")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{lab_path}: label {int(labels.max())} out of range 0..9; the file is corrupt")
    x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1)  # astype copies: the cached array stays intact
    x = (x / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    return x, torch.from_numpy(labels.astype(np.int64))


# --------------------------------------------------------------------------------------------------- model


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


# ------------------------------------------------------------------------------------------------ training


@torch.enable_grad()  # callers may hold no_grad (load_workload does)
def train_fmnist_cnn(
    epochs: int = DEFAULT_EPOCHS,
    seed: int = DEFAULT_SEED,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    threads: int | None = None,
    progress: bool = True,
    max_steps: int | None = None,
) -> FmnistCNN:
    """Train :class:`FmnistCNN` on the Fashion-MNIST train split; returns it in eval mode.

    Deterministic on the CPU: the same arguments (and torch build / machine) give bit-identical weights. The
    initialisation draws from the global RNG seeded with ``seed`` inside ``torch.random.fork_rng`` and the
    per-epoch shuffles from a local ``torch.Generator`` seeded with ``seed``, so the caller's global RNG state is
    left unchanged. SGD with Nesterov momentum 0.9 and weight decay 5e-4, one-cycle learning rate peaking at
    ``lr`` (per step), cross-entropy loss, batches of ``batch_size`` (the last one of an epoch may be smaller).

    ``threads``: torch intra-op threads during training (restored afterwards); ``None`` keeps the current
    setting. ``max_steps``: stop after that many optimizer steps (the schedule is compressed to fit), for
    quick tests. ``progress``: a tqdm bar per epoch.
    """
    if epochs < 1 or batch_size < 1 or (max_steps is not None and max_steps < 1):
        raise ValueError(f"epochs, batch_size and max_steps must be >= 1 (got {epochs}, {batch_size}, {max_steps})")
    images, labels = load_fashion_mnist("train")
    n = images.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch if max_steps is None else min(epochs * steps_per_epoch, max_steps)
    prev_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = FmnistCNN()
        gen = torch.Generator().manual_seed(seed)
        model = model.to(memory_format=torch.channels_last).train()  # ~1.5x faster convolutions on the CPU
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total)
        step = 0
        for epoch in range(epochs):
            perm = torch.randperm(n, generator=gen)
            n_steps = min(steps_per_epoch, total - step)
            bar = tqdm(range(n_steps), desc=f"fmnist-cnn epoch {epoch + 1}/{epochs}", disable=not progress)
            for i in bar:
                idx = perm[i * batch_size : (i + 1) * batch_size]
                xb = images[idx].contiguous(memory_format=torch.channels_last)
                loss = F.cross_entropy(model(xb), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                if i % 20 == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.close()
            if step >= total:
                break
    finally:
        torch.set_num_threads(prev_threads)
    return model.to(memory_format=torch.contiguous_format).eval()


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` on ``images`` ``[N, ...]`` with int labels ``[N]``.

    The model runs in eval mode (its previous mode is restored afterwards), in batches of ``batch_size`` on the
    device of its first parameter.
    """
    if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ValueError(f"need as many (>0) images as labels, got {images.shape[0]} and {labels.shape[0]}")
    device = next(iter(model.parameters()), torch.empty(0)).device
    was_training = model.training
    model.eval()
    try:
        correct = 0
        for i in range(0, images.shape[0], batch_size):
            pred = model(images[i : i + batch_size].to(device)).argmax(dim=-1).cpu()
            correct += int((pred == labels[i : i + batch_size]).sum())
    finally:
        model.train(was_training)
    return correct / images.shape[0]


# --------------------------------------------------------------------------------------------------- cache


def fmnist_cnn_cache_path(cache_dir: Path | str | None = None) -> Path:
    """``cache_dir / fmnist-cnn-v1.safetensors``, ``cache_dir`` defaulting to ``$NUMCAST_CACHE`` or
    ``~/.cache/numcast``."""
    d = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    return d / FMNIST_CNN_CACHE_NAME


def _save_atomic(model: FmnistCNN, path: Path, metadata: dict[str, str]) -> None:
    """Write ``model``'s state dict to a temporary file beside ``path``, then ``os.replace`` it into place."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_cached(path: Path) -> FmnistCNN:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises SafetensorError (and OSError) on a truncated/garbled file
        raise ValueError(f"{path}: corrupt FmnistCNN cache ({e}); delete it to retrain") from e
    if meta.get("format") != FMNIST_CNN_FORMAT:
        raise ValueError(f"{path}: not an FmnistCNN cache (format {meta.get('format')!r}); delete it to retrain")
    model = FmnistCNN()
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: corrupt FmnistCNN cache ({e}); delete it to retrain") from e
    return model.eval()


def load_fmnist_cnn(cache_dir: Path | str | None = None, train_if_missing: bool = True) -> FmnistCNN:
    """The default trained :class:`FmnistCNN`, in eval mode, from the cache (training it when missing).

    The cache is :func:`fmnist_cnn_cache_path` ``(cache_dir)``, a safetensors file whose metadata records
    ``format``, ``seed``, ``epochs``, ``batch_size``, ``lr``, ``threads``, ``test_accuracy`` (top-1 on the
    10000 test images), ``train_seconds`` and ``torch_version``. When it is missing the model is trained with
    the default recipe on :data:`DEFAULT_THREADS` threads (about 2 minutes on 2 idle cores) and saved atomically
    (temporary file + ``os.replace``), unless ``train_if_missing`` is false, which raises ``FileNotFoundError``.
    A corrupt cache file raises ``ValueError`` naming it (it is never silently retrained).
    """
    path = fmnist_cnn_cache_path(cache_dir)
    if path.exists():
        return _load_cached(path)
    if not train_if_missing:
        raise FileNotFoundError(f"{path} does not exist; call load_fmnist_cnn(train_if_missing=True) to train it")
    t0 = time.perf_counter()
    model = train_fmnist_cnn(
        epochs=DEFAULT_EPOCHS, seed=DEFAULT_SEED, batch_size=DEFAULT_BATCH_SIZE, lr=DEFAULT_LR, threads=DEFAULT_THREADS
    )
    seconds = time.perf_counter() - t0
    acc = accuracy(model, *load_fashion_mnist("test"))
    metadata = {
        "format": FMNIST_CNN_FORMAT,
        "seed": str(DEFAULT_SEED),
        "epochs": str(DEFAULT_EPOCHS),
        "batch_size": str(DEFAULT_BATCH_SIZE),
        "lr": repr(DEFAULT_LR),
        "threads": str(DEFAULT_THREADS),
        "test_accuracy": f"{acc:.4f}",
        "train_seconds": f"{seconds:.1f}",
        "torch_version": torch.__version__,
    }
    _save_atomic(model, path, metadata)
    return model
