"""The user's own calibration or evaluation data (``--calibration-data`` / ``--eval-data``), read from a path:

- text: a ``.txt`` file, a folder of ``.txt`` files (sorted by name), or a ``.jsonl`` file with a ``text``
  field per line; for language models and text encoders;
- images: a folder of images (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``, ``.webp``), either in class
  subfolders (the torchvision ImageFolder layout: labels are the sorted subfolder indices, so they must follow
  the model's class order) or directly in the folder (no labels); for image classifiers;
- tensors: a ``.pt`` file (a tensor, or a dict of named tensors) or a ``.safetensors`` file: model inputs
  with the samples along dimension 0, for any model.

Every read names the file that fails; empty data is an error. :meth:`UserData.record` is what the report keeps:
path, kind, count and a SHA-256 over the files' bytes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass
class UserData:
    """Data read from ``path``: ``texts`` (text), ``images`` (HxWx3 uint8 arrays) with optional ``labels`` and
    ``classes`` (images), or ``tensors`` (name → tensor, samples along dim 0; the name ``""`` for a bare
    tensor)."""

    path: str
    kind: str  # "text" | "images" | "tensors"
    sha256: str
    texts: list[str] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    labels: torch.Tensor | None = None
    classes: list[str] | None = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def count(self) -> int:
        if self.kind == "text":
            return len(self.texts)
        if self.kind == "images":
            return len(self.images)
        return next(iter(self.tensors.values())).shape[0]

    def record(self) -> dict:
        return {"path": self.path, "kind": self.kind, "count": self.count, "sha256": self.sha256,
                "labelled": self.labels is not None if self.kind == "images" else None}  # fmt: skip

    def batches(self, n: int, size: int) -> list:
        """The first ``n`` samples of tensor data as model inputs, ``size`` per batch (a tensor, or a dict of
        keyword arguments); ``ValueError`` when fewer are there."""
        if self.kind != "tensors":
            raise ValueError(f"{self.path}: {self.kind} data is not model inputs; this model takes tensors here")
        if n > self.count:
            raise ValueError(f"{self.path} holds {self.count} samples; {n} were asked for")
        out = []
        for i in range(0, n, size):
            j = min(n, i + size)
            part = {k: v[i:j] for k, v in self.tensors.items()}
            out.append(part[""] if set(part) == {""} else part)
        return out


def _digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _texts_of(path: Path) -> list[str]:
    try:
        if path.suffix == ".jsonl":
            texts = []
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise ValueError(f"line {i} has no string field 'text'")
                texts.append(row["text"])
            return texts
        return [path.read_text()]
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise ValueError(f"{path}: not readable as text data ({exc})") from exc


def _image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))  # a writable copy
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path}: not a readable image ({exc})") from exc


def load_user_data(path: str | Path) -> UserData:
    """Read the data at ``path`` (module docstring)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such data file or folder")
    if p.is_file() and p.suffix in (".txt", ".jsonl"):
        data = UserData(str(p), "text", _digest([p]), texts=[t for t in _texts_of(p) if t.strip()])
    elif p.is_file() and p.suffix in (".pt", ".pth", ".safetensors"):
        data = UserData(str(p), "tensors", _digest([p]), tensors=_tensors_of(p))
    elif p.is_dir():
        data = _folder(p)
    else:
        raise ValueError(f"{p}: unsupported data; give a .txt / .jsonl file, a folder of .txt files or images, or "
                         "a .pt / .safetensors file of model inputs")  # fmt: skip
    if data.count == 0:
        raise ValueError(f"{p}: no {data.kind} in it")
    return data


def _folder(p: Path) -> UserData:
    txts = sorted(f for f in p.iterdir() if f.suffix == ".txt")
    if txts:
        return UserData(str(p), "text", _digest(txts), texts=[t for f in txts for t in _texts_of(f) if t.strip()])
    classes = sorted(d.name for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes:
        files, labels = [], []
        for c, name in enumerate(classes):
            found = sorted(f for f in (p / name).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            files += found
            labels += [c] * len(found)
        return UserData(str(p), "images", _digest(files), images=[_image(f) for f in files],
                        labels=torch.tensor(labels, dtype=torch.int64), classes=classes)  # fmt: skip
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{p}: no .txt files, images or class subfolders of images in it")
    return UserData(str(p), "images", _digest(files), images=[_image(f) for f in files])


def _tensors_of(p: Path) -> dict[str, torch.Tensor]:
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(p))
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - each reader raises its own types for a damaged file
        raise ValueError(f"{p}: not a readable tensor file ({type(exc).__name__}: {exc})") from exc
    tensors = {"": obj} if isinstance(obj, torch.Tensor) else obj
    if not isinstance(tensors, dict) or not tensors or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise ValueError(f"{p}: expected a tensor or a dict of tensors (model inputs), got {type(obj).__name__}")
    sizes = {v.shape[0] if v.dim() else None for v in tensors.values()}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"{p}: every tensor needs the samples along dimension 0, with the same count; got {sizes}")
    return tensors
