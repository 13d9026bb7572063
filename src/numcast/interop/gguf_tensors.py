"""numcast QTensors as GGUF (llama.cpp) quantized tensors, byte for byte, without re-quantizing.

Layouts (llama.cpp ``ggml/src/ggml-common.h``; the independent decoder is PyPI ``gguf``'s
``gguf.quants.dequantize``; ``../shared/design/interop.md`` §1). A tensor is ``[out, in]`` (numcast's 2-D weight
view), blocks along ``in``:

- signed int4 with one FP16 scale per group of 32·k (``int4_g32``, ``int4_g128``) → Q4_0: per 32 values the fp16
  ``d``, then 16 bytes, byte j = nibble j (low) | nibble j+16 (high), nibble = code + 8;
- signed int8 with one FP16 scale per group of 32·k (``int8_g32``) → Q8_0: fp16 ``d``, 32 × int8;
- ``mxfp4`` (E2M1, E8M0 per 32) → MXFP4: the E8M0 byte, then 16 bytes in split halves (the nibble is the E2M1
  code);
- ``nvfp4`` (E2M1, E4M3 per 16, FP32 tensor scale) → NVFP4: per 64 values 4 UE4M3 sub-block scales, then per
  sub-block 8 bytes in split halves; the FP32 tensor scale is a separate tensor (``<weight name>.scale``).

A group of G = 32·k values with one FP16 scale is written as k GGUF blocks with the same ``d``; the values are
the same products, so ``gguf.quants.dequantize`` (× the tensor scale for NVFP4) equals ``QTensor.dequantize()``
bit for bit (tested), up to the sign of zero: ggml's E2M1 table decodes the −0 code (8) as +0. Anything else
(per-channel FP32 scales, FP8, zero points, blocks that are not whole, a NaN block) is refused naming the format
and why.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from numcast.formats.qtensor import QTensor
from numcast.formats.spec import E4M3, E8M0, FP16, FloatElement, Format, IntElement

Q4_0, Q8_0, MXFP4, NVFP4 = 2, 8, 39, 40  # GGML type ids (gguf.GGMLQuantizationType)
TYPE_NAMES = {Q4_0: "Q4_0", Q8_0: "Q8_0", MXFP4: "MXFP4", NVFP4: "NVFP4"}
E2M1 = FloatElement(2, 1, policy="finite")


@dataclass
class GGUFTensor:
    """Packed GGUF blocks: ``data`` uint8 ``[out, bytes per row]``, the GGML type id, and the FP32 tensor scale
    that NVFP4 stores as a separate ``<name>.scale`` tensor (None otherwise)."""

    data: np.ndarray
    ggml_type: int
    tensor_scale: float | None = None

    @property
    def type_name(self) -> str:
        return TYPE_NAMES[self.ggml_type]


def gguf_type(fmt: Format) -> tuple[int | None, str]:
    """(GGML type id, "") for a format GGUF stores exactly, else (None, why not)."""
    el, sc = fmt.element, fmt.scaling
    if sc.sub_block_size:
        return None, f"{fmt.label}: sub-block exponent offsets (shared microexponents) have no GGUF block type"
    blocked = sc.granularity == "block" and sc.axis in (-1, 1) and not sc.zero_point
    if isinstance(el, IntElement) and el.signed and not el.frac_bits and el.bits in (4, 8):
        if not blocked or sc.scale_format != FP16 or sc.power_of_two or sc.tensor_scale:
            return None, f"{fmt.label}: GGUF's Q{el.bits}_0 needs one FP16 scale per group along the input axis"
        if sc.block_size % 32:
            return None, f"{fmt.label}: GGUF's Q{el.bits}_0 blocks hold 32 values; groups of {sc.block_size} don't tile"
        return (Q4_0 if el.bits == 4 else Q8_0), ""
    if el == E2M1 and blocked:
        if sc.scale_format == E8M0 and sc.block_size == 32 and not sc.tensor_scale:
            return MXFP4, ""
        if sc.scale_format == E4M3 and sc.block_size == 16 and sc.tensor_scale:
            return NVFP4, ""
    return None, f"{fmt.label} has no GGUF block type (GGUF stores int4/int8 groups of 32·k, MXFP4 and NVFP4)"


def _split_halves(nibbles: np.ndarray, half: int) -> np.ndarray:
    """``[..., 2·half]`` nibbles → ``[..., half]`` bytes: byte j = nibble j | nibble j+half << 4."""
    return (nibbles[..., :half] | (nibbles[..., half:] << 4)).astype(np.uint8)


def pack_gguf(qt: QTensor, name: str = "tensor") -> GGUFTensor:
    """The GGUF blocks of a 2-D QTensor ``[out, in]`` (module docstring); ``ValueError`` naming ``name``, the
    format and the reason when GGUF cannot store it exactly."""
    kind, why = gguf_type(qt.format)
    if kind is None:
        raise ValueError(f"{name}: {why}")
    if len(qt.shape) != 2:
        raise ValueError(f"{name}: GGUF tensors here are 2-D weight views [out, in], got shape {qt.shape}")
    out, n_in = qt.shape
    block = 64 if kind == NVFP4 else 32
    if n_in % block or n_in % (qt.format.block_size or 1):
        raise ValueError(f"{name}: {n_in} inputs are not whole {TYPE_NAMES[kind]} blocks of {block}")
    scales = qt.scales()
    if scales is not None and not bool(torch.isfinite(scales).all()):
        raise ValueError(f"{name}: a block holds NaN/inf (NaN scale); GGUF has no code for it")
    codes = qt.codes.to(torch.int64).numpy()
    raw = qt.scale_codes.to(torch.int64).numpy()
    if kind in (Q4_0, Q8_0):
        bits = qt.format.element.bits
        q = np.where(codes >= 1 << (bits - 1), codes - (1 << bits), codes)  # two's complement codes -> values
        d = np.repeat(raw.astype(np.uint16), qt.format.block_size // 32, axis=1)  # one fp16 d per 32 values
        d = d.reshape(out, n_in // 32, 1).view(np.uint8)  # little-endian fp16 bytes
        q = q.reshape(out, n_in // 32, 32)
        body = _split_halves((q + 8).astype(np.uint8), 16) if kind == Q4_0 else q.astype(np.int8).view(np.uint8)
        data = np.concatenate([d.reshape(out, n_in // 32, 2), body], axis=-1)
        return GGUFTensor(data.reshape(out, -1), kind)
    if kind == MXFP4:
        e = raw.astype(np.uint8).reshape(out, n_in // 32, 1)
        body = _split_halves(codes.astype(np.uint8).reshape(out, n_in // 32, 32), 16)
        return GGUFTensor(np.concatenate([e, body], axis=-1).reshape(out, -1), kind)
    s = raw.astype(np.uint8).reshape(out, n_in // 64, 4)  # positive E4M3 codes are UE4M3's bits
    body = _split_halves(codes.astype(np.uint8).reshape(out, n_in // 64, 4, 16), 8).reshape(out, n_in // 64, 32)
    return GGUFTensor(np.concatenate([s, body], axis=-1).reshape(out, -1), kind, float(qt.tensor_scale))
