"""Writing outputs so that nothing a user owns is lost and identical runs give identical bytes.

- :func:`write_atomic`: a file is written to a temporary sibling and renamed into place, so an interrupted
  write leaves the old file (or nothing) behind, never half a file.
- :func:`save_safetensors`: a safetensors file with a canonical header (keys sorted, fixed separators), so the
  same tensors and metadata always give the same bytes (safetensors' own writer orders metadata keys by a hash
  map), plus a SHA-256 of every tensor's bytes and of the other metadata entries; :func:`load_safetensors`
  verifies them and names the tensor (or the metadata) that fails.
- :class:`OutputDir`: a run's output directory, built in a temporary sibling and renamed over the target only
  when the run succeeded; ``overwrite`` replaces only a directory numcast wrote (it carries a marker file),
  never anything else.

Import-free of the rest of numcast: the lowest layer, usable by every other.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

MARKER = ".numcast-output"  # the file that says "numcast wrote this directory"
CHECKSUM_KEY = "numcast_sha256"  # metadata entry: JSON {tensor name: sha256 of its bytes}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usual_mode(path: Path, directory: bool) -> None:
    """Give a temporary file or directory the mode an ordinary one would get (mkstemp/mkdtemp make them
    private)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path`` (atomic on POSIX).
    The parent directory must exist; on any error (or Ctrl-C) the temporary file is removed and ``path`` is
    untouched."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: the directory {path.parent} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a file name")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        _usual_mode(Path(tmp), directory=False)
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _metadata_sha256(meta: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


METADATA_ENTRY = "__metadata__"  # the checksum entry that covers the other metadata (formats, shapes, ...)


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The bytes of a safetensors file with a canonical header: the same tensors and metadata give the same
    bytes whatever their insertion order. A SHA-256 of every tensor is added to the metadata
    (:data:`CHECKSUM_KEY`)."""
    header, data = _safetensors_parts(tensors, metadata)
    return header + bytes(data)


def _safetensors_parts(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> tuple[bytes, memoryview]:
    """(length + canonical header, the data section as a view of safetensors' own buffer: not copied)."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = dict(metadata or {})
    sums = {k: _sha256(v) for k, v in tensors.items()}
    sums[METADATA_ENTRY] = _metadata_sha256(meta)
    meta[CHECKSUM_KEY] = json.dumps(sums, sort_keys=True)
    raw = save(tensors, metadata=meta)
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(text)) + text, memoryview(raw)[8 + n :]


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> Path:  # fmt: skip
    """Write :func:`safetensors_bytes` to ``path`` atomically."""
    header, data = _safetensors_parts(tensors, metadata)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(data)

    return write_atomic(path, write)


def load_safetensors(path: str | os.PathLike, what: str = "safetensors file") -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a file written by :func:`save_safetensors`; ``ValueError`` naming the file (and the
    tensor) when it is unreadable, a checksum is missing or a tensor's bytes do not match it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for damaged headers
        raise ValueError(f"{path}: not a readable {what} ({exc})") from exc
    try:
        sums = json.loads(meta.pop(CHECKSUM_KEY))
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{path}: no tensor checksums in the metadata; not a {what} written by numcast") from exc
    if sums.pop(METADATA_ENTRY, None) != _metadata_sha256(meta):
        raise ValueError(f"{path}: the metadata (formats, shapes, ...) does not match its checksum; it was edited")
    if set(sums) != set(tensors):
        raise ValueError(f"{path}: the checksums name other tensors than the file holds; the file was altered")
    for k, t in tensors.items():
        if _sha256(t) != sums[k]:
            raise ValueError(f"{path}: tensor {k!r} does not match its checksum; the file is damaged or was altered")
    return tensors, meta


class OutputDir:
    """A run's output directory, written atomically (module docstring).

    ``with OutputDir(out, overwrite) as d:`` checks the target before any work (refusing a file, or an existing
    non-empty directory without ``overwrite``, or one numcast did not write), yields a fresh temporary sibling
    ``d.tmp`` to write into, and on success renames it over ``out`` (the previous numcast output is removed only
    then). On an error or Ctrl-C the temporary directory is removed and ``out`` is left as it was."""

    def __init__(self, out: str | os.PathLike, overwrite: bool = False) -> None:
        self.out = Path(out)
        self.overwrite = overwrite
        self.tmp: Path | None = None
        check_output_dir(self.out, overwrite)

    def __enter__(self) -> OutputDir:
        parent = self.out.resolve().parent
        parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{self.out.resolve().name}.", suffix=".tmp"))
        _usual_mode(self.tmp, directory=True)
        (self.tmp / MARKER).write_text("written by numcast; `--overwrite` may replace this directory\n")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        check_output_dir(self.out, self.overwrite)  # nothing appeared there meanwhile that is not ours
        target = self.out.resolve()
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        try:
            os.replace(self.tmp, target)
        except BaseException:
            if old is not None:
                os.replace(old, target)  # put the previous output back
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        if old is None:
            return
        if (old / MARKER).is_file():
            shutil.rmtree(old, ignore_errors=True)  # an earlier numcast output, replaced by this run
        else:
            old.rmdir()  # the empty directory the user named (rmdir refuses anything that is not empty)


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse an output directory numcast must not write into (see :class:`OutputDir`)."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a directory; give a directory for the outputs")
    if not out.is_dir():
        return
    contents = sorted(p.name for p in out.iterdir())
    if not contents:
        return
    if not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace an earlier numcast output")
    if MARKER not in contents:
        shown = ", ".join(contents[:5]) + (", ..." if len(contents) > 5 else "")
        raise FileExistsError(
            f"{out} was not written by numcast (no {MARKER} marker; it holds {shown}); --overwrite only replaces "
            "numcast's own outputs: choose another --out"
        )
