"""Bit packing of raw codes: ``bits``-bit codes laid end to end, least significant bit first.

Code i occupies stream bits [i·b, (i+1)·b); stream bit k is bit (k mod 8) of byte k div 8 (little-endian
bit order, as OCP MX's "element 0 in the low nibble" for FP4). The last byte is zero-padded.
"""

from __future__ import annotations

import numpy as np
import torch


def packed_nbytes(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> bytes:
    """Pack non-negative integer codes (< 2^bits) into bytes."""
    c = codes.detach().reshape(-1).cpu().numpy().astype(np.uint64, copy=False)
    if bits in (8, 16, 32, 64):
        return c.astype(np.dtype(f"<u{bits // 8}")).tobytes()
    if bits == 4:
        c = c.astype(np.uint8)
        if c.size % 2:
            c = np.append(c, np.uint8(0))
        return (c[0::2] | (c[1::2] << 4)).astype(np.uint8).tobytes()
    shifts = np.arange(bits, dtype=np.uint64)
    stream = ((c[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(stream, bitorder="little").tobytes()


def unpack_bits(data: bytes, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``n`` codes as int64."""
    need = packed_nbytes(n, bits)
    if len(data) < need:
        raise ValueError(f"packed data holds {len(data)} bytes, {n} codes of {bits} bits need {need}")
    buf = np.frombuffer(data, dtype=np.uint8, count=need)
    if bits in (8, 16, 32, 64):
        out = buf.view(np.dtype(f"<u{bits // 8}")).astype(np.int64)
    elif bits == 4:
        out = np.stack([buf & 15, buf >> 4], axis=1).reshape(-1)[:n].astype(np.int64)
    else:
        stream = np.unpackbits(buf, bitorder="little")[: n * bits].reshape(n, bits).astype(np.int64)
        out = (stream << np.arange(bits, dtype=np.int64)).sum(axis=1)
    return torch.from_numpy(np.ascontiguousarray(out))
