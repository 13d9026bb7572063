"""The IDX file format (LeCun's MNIST format, also used by Fashion-MNIST), gzip-compressed: a parser that
refuses anything but a well-formed unsigned-byte file."""

from __future__ import annotations

import gzip
import math
import zlib
from functools import lru_cache

import numpy as np

_IDX_UBYTE = 0x08  # IDX type code of unsigned bytes, the only element type the MNIST family uses


@lru_cache(maxsize=8)
def read_idx(path: str, ndim: int, reinstall: str) -> np.ndarray:
    """The uint8 array stored in the gzip-compressed IDX file ``path`` (read-only; cached per path).

    IDX: two zero bytes, a type byte (0x08 = uint8), a byte with the number of dimensions, then one big-endian
    uint32 per dimension, then the data in C order. Anything else raises ``ValueError`` naming the file and
    ``reinstall`` (how to get a good copy).
    """
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: not a readable gzip file ({e}); reinstall with: {reinstall}") from e
    header = 4 + 4 * ndim
    if len(raw) < header or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE or raw[3] != ndim:
        raise ValueError(
            f"{path}: bad IDX magic number {raw[:4].hex() or '(empty)'} (expected 000008{ndim:02x}); "
            f"the file is corrupt, reinstall with: {reinstall}"
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if len(raw) - header != math.prod(shape):
        raise ValueError(
            f"{path}: IDX header announces shape {shape} ({math.prod(shape)} bytes) but {len(raw) - header} data "
            f"bytes follow; the file is corrupt, reinstall with: {reinstall}"
        )
    arr = np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)
    arr.flags.writeable = False
    return arr
