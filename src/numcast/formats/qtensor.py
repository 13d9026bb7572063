"""QTensor: exact integer codes + scales + format metadata, with true bit packing and safetensors I/O.

Storage layout of :meth:`QTensor.pack` (all little-endian, see :mod:`numcast.formats.packing`):
``[element codes, bits each][block/channel scale codes, scale-format bits each][sub-block offsets,
sub_offset_bits each][zero points, element bits each][per-tensor FP32 scale, 4 bytes]``; absent parts take no
bytes. ``nbytes`` is that length, so MXFP4 costs (32·4 + 8)/32 = 4.25 bits per value and MX9 (16·8 + 8 +
8·1)/16 = 9.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

import torch

from numcast.formats.element import code_dtype, decode, encode, work_dtype
from numcast.formats.engine import GridCast, dequantize_rows, two_level_f32
from numcast.formats.layout import Layout
from numcast.formats.packing import pack_bits, packed_nbytes, unpack_bits
from numcast.formats.scale import Scales
from numcast.formats.spec import Format
from numcast.io import load_safetensors, save_safetensors

_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}


@dataclass
class QTensor:
    """A quantized tensor.

    - ``codes``: raw element codes (bit patterns, two's complement for signed ints), shape ``shape``.
    - ``scale_codes``: raw scale codes in the scale format, shape ``Layout.scale_shape`` (None if unscaled).
    - ``zero_point``: integer zero points, same shape as the scales (None unless the format has them).
    - ``tensor_scale``: the FP32 per-tensor scale of two-level formats (NVFP4), else None.
    - ``dtype``: the dtype ``dequantize`` returns (the input's).
    - ``sub_offsets``: the raw sub-block exponent offsets τ (shared microexponents: MX9/MX6/MX4), shape
      ``Layout.sub_offset_shape`` (block/sub_block per block, in the order of the scales), else None; the values
      of a sub-block use its block's scale × 2^−τ.
    """

    codes: torch.Tensor
    scale_codes: torch.Tensor | None
    zero_point: torch.Tensor | None
    tensor_scale: float | None
    format: Format
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    sub_offsets: torch.Tensor | None = None

    # ---- construction ------------------------------------------------------------------------
    @staticmethod
    def from_grid_cast(r: GridCast, fmt: Format, shape: tuple[int, ...], dtype: torch.dtype) -> QTensor:
        """Encode an engine result (:func:`numcast.formats.engine.grid_cast`) of a ``shape`` tensor."""
        sc = r.scales
        values = r.values
        nan_blocks = torch.isnan(sc.scale) if sc.scale is not None else None
        if nan_blocks is not None and nan_blocks.any():  # a NaN scale says "this block is NaN": its elements as 0
            values = values.masked_fill(nan_blocks.to(values.device)[:, None], 0.0)
        codes = r.layout.from_rows(encode(values, fmt.element)).reshape(shape).contiguous()
        scale_codes = zp = None
        if sc.scale is not None:
            scale_codes = encode(sc.scale, fmt.scaling.scale_format).reshape(r.layout.scale_shape)
        if sc.zero_point is not None:
            zp = sc.zero_point.to(torch.int64).reshape(r.layout.scale_shape)
        sub = None
        if sc.sub_offset is not None:  # a NaN block's offsets say nothing: stored as 0
            tau = torch.where(torch.isnan(sc.scale)[:, None].to(sc.sub_offset.device), 0, sc.sub_offset)
            sub = tau.to(code_dtype(fmt.scaling.sub_offset_bits)).reshape(r.layout.sub_offset_shape(sc.sub_block))
        ts = None if sc.tensor_scale is None else float(sc.tensor_scale)
        return QTensor(codes, scale_codes, zp, ts, fmt, tuple(shape), dtype, sub)

    @staticmethod
    def concat(parts: list[QTensor]) -> QTensor:
        """Slices of one tensor along its first axis, quantized apart (same format, scales per block along
        another axis, per channel of the first axis, or none; one tensor scale), as the QTensor of the whole."""
        first = parts[0]
        if any(p.format != first.format or p.shape[1:] != first.shape[1:] or p.dtype != first.dtype
               or p.tensor_scale != first.tensor_scale for p in parts):  # fmt: skip
            raise ValueError("QTensor.concat takes first-axis slices of one tensor in one format and tensor scale")

        def cat(name: str) -> torch.Tensor | None:
            return None if getattr(first, name) is None else torch.cat([getattr(p, name) for p in parts])

        shape = (sum(p.shape[0] for p in parts), *first.shape[1:])
        return QTensor(cat("codes"), cat("scale_codes"), cat("zero_point"), first.tensor_scale, first.format, shape,
                       first.dtype, cat("sub_offsets"))  # fmt: skip

    # ---- values ------------------------------------------------------------------------------
    @property
    def layout(self) -> Layout:
        return Layout.of(self.shape, self.format.scaling)

    def scales(self) -> torch.Tensor | None:
        """Decoded scale values (float64), shape ``layout.scale_shape``."""
        if self.scale_codes is None:
            return None
        return decode(self.scale_codes, self.format.scaling.scale_format, torch.float64)

    def _row_scales(self) -> Scales:
        """The stored scales as the engine's per-row :class:`Scales`."""
        if self.scale_codes is None:
            return Scales(None)
        s = self.scales().reshape(-1)
        zp = self.zero_point.reshape(-1).double() if self.zero_point is not None else None
        sub, k = None, self.format.scaling.sub_block_size or 0
        if self.sub_offsets is not None:
            sub = self.sub_offsets.reshape(s.shape[0], -1).to(torch.int64)
        return Scales(s, self.tensor_scale, zp, sub, k)

    def element_scales(self) -> torch.Tensor | None:
        """The scale of every element (float64, shape ``shape``): its block/channel/tensor scale × the FP32
        tensor scale × 2^−τ of its sub-block; None for unscaled formats. (Zero points are not in it.)"""
        sc = self._row_scales()
        if sc.scale is None:
            return None
        layout = self.layout
        width = layout.to_rows(torch.zeros(self.shape, dtype=torch.float64)).shape[1]
        per = sc.per_element().to(self.codes.device)
        return layout.from_rows(per.expand(per.shape[0], width)).reshape(self.shape)

    def dequantize(self) -> torch.Tensor:
        """The real values; equals ``numcast.cast`` of the original tensor bit for bit."""
        fmt, layout = self.format, self.layout
        work = work_dtype(fmt.element, fmt.scaling, self.dtype)
        vals = layout.to_rows(decode(self.codes, fmt.element, work))
        f32 = self.dtype == torch.float32 and two_level_f32(fmt)
        out = layout.from_rows(dequantize_rows(vals, self._row_scales(), work, f32))
        return out.reshape(self.shape).to(self.dtype)

    # ---- storage -----------------------------------------------------------------------------
    def _parts(self) -> list[tuple[str, int, int]]:
        """(name, bits, count) of each stored part."""
        return storage_parts(tuple(self.shape), self.format)

    @property
    def nbytes(self) -> int:
        """True storage size in bytes including scales (the length of :meth:`pack`)."""
        return storage_nbytes(tuple(self.shape), self.format)

    @property
    def bits_per_value(self) -> float:
        return 8 * self.nbytes / max(math.prod(self.shape), 1)

    def pack(self) -> bytes:
        """Codes, scales, zero points and tensor scale packed at their true bit widths."""
        src = {"codes": self.codes, "scales": self.scale_codes, "sub_offsets": self.sub_offsets,
               "zero_point": self.zero_point}  # fmt: skip
        out = b"".join(pack_bits(src[name].to(torch.int64), bits) for name, bits, _ in self._parts())
        if self.format.scaling.tensor_scale:
            out += struct.pack("<f", self.tensor_scale)
        return out

    @staticmethod
    def unpack(data: bytes, fmt: Format, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> QTensor:
        """Rebuild a QTensor from :meth:`pack` output; ``ValueError`` if the length does not match."""
        shape = tuple(shape)
        probe = QTensor(torch.empty(0), None, None, None, fmt, shape, dtype)
        if len(data) != probe.nbytes:
            raise ValueError(f"packed {fmt.label} tensor of shape {shape} needs {probe.nbytes} bytes, got {len(data)}")
        layout, got, off = probe.layout, {}, 0
        for name, bits, count in probe._parts():
            nb = packed_nbytes(count, bits)
            got[name] = unpack_bits(data[off : off + nb], bits, count)
            off += nb
        ts = struct.unpack("<f", data[off : off + 4])[0] if fmt.scaling.tensor_scale else None
        codes = got["codes"].to(code_dtype(fmt.element.bits)).reshape(shape)
        sc = got.get("scales")
        if sc is not None:
            sc = sc.to(code_dtype(fmt.scaling.scale_format.bits)).reshape(layout.scale_shape)
        zp = got.get("zero_point")
        if zp is not None:
            zp = zp.reshape(layout.scale_shape)
        sub = got.get("sub_offsets")
        if sub is not None:
            k = fmt.scaling.sub_block_size
            sub = sub.to(code_dtype(fmt.scaling.sub_offset_bits)).reshape(layout.sub_offset_shape(k))
        return QTensor(codes, sc, zp, ts, fmt, shape, dtype, sub)

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write the packed tensor to a safetensors file (atomically; the format, shape and dtype in its metadata,
        with checksums of the bytes and the metadata, :func:`numcast.io.save_safetensors`)."""
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --overwrite) to replace it")
        data = (
            torch.frombuffer(bytearray(self.pack()), dtype=torch.uint8)
            if self.nbytes
            else torch.empty(0, dtype=torch.uint8)
        )
        meta = {
            "numcast_format": self.format.to_json(),
            "numcast_format_name": self.format.name or "",
            "shape": json.dumps(list(self.shape)),
            "dtype": str(self.dtype),
        }
        save_safetensors({"packed": data}, path, meta)

    @staticmethod
    def load(path: str | os.PathLike) -> QTensor:
        """Read a tensor written by :meth:`save`; a damaged or altered file (bytes or metadata) raises
        ``ValueError`` naming it, never returns other values."""
        tensors, meta = load_safetensors(path, "numcast QTensor file")
        try:
            packed = tensors["packed"]
            fmt = Format.from_json(meta["numcast_format"])
            if meta.get("numcast_format_name"):
                fmt = fmt.with_(name=meta["numcast_format_name"])
            shape = tuple(json.loads(meta["shape"]))
            dtype = _DTYPES[meta["dtype"]]
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"{path}: missing or invalid numcast metadata ({exc})") from exc
        try:
            return QTensor.unpack(packed.numpy().tobytes(), fmt, shape, dtype)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc


@dataclass(frozen=True)
class PackedQTensor:
    """A :class:`QTensor` held in memory as its :meth:`QTensor.pack` bytes: the true bit widths (MXFP4: 4.25 bits
    per value instead of the 8 of its one-byte codes), given back bit for bit by :meth:`unpack`."""

    data: bytes
    format: Format
    shape: tuple[int, ...]
    dtype: torch.dtype

    @staticmethod
    def of(qt: QTensor) -> PackedQTensor:
        return PackedQTensor(qt.pack(), qt.format, tuple(qt.shape), qt.dtype)

    def unpack(self) -> QTensor:
        return QTensor.unpack(self.data, self.format, self.shape, self.dtype)


def compact(qt: QTensor) -> QTensor | PackedQTensor:
    """``qt`` as it is best held in memory between uses: 4-bit codes packed two to a byte (half their memory),
    other widths as they are (8-bit codes are packed already; packing other widths goes through a bit-stream
    temporary of 8 bytes per code bit, :func:`numcast.formats.packing.pack_bits`)."""
    return PackedQTensor.of(qt) if qt.format.element.bits == 4 else qt


def storage_parts(shape: tuple[int, ...], fmt: Format) -> list[tuple[str, int, int]]:
    """(name, bits, count) of each stored part of a ``shape`` tensor in ``fmt``."""
    n = math.prod(shape)
    parts = [("codes", fmt.element.bits, n)]
    if fmt.scaling.scaled:
        ns = math.prod(Layout.of(shape, fmt.scaling).scale_shape)
        parts.append(("scales", fmt.scaling.scale_format.bits, ns))
        if fmt.scaling.sub_block_size:
            parts.append(("sub_offsets", fmt.scaling.sub_offset_bits, ns * fmt.scaling.sub_blocks_per_block))
        if fmt.scaling.zero_point:
            parts.append(("zero_point", fmt.element.bits, ns))
    return parts


def storage_nbytes(shape: tuple[int, ...], fmt: Format) -> int:
    """Packed bytes of a ``shape`` tensor in ``fmt`` (codes, scales, zero points, tensor scale): what
    :attr:`QTensor.nbytes` reports, without quantizing anything."""
    size = sum(packed_nbytes(c, b) for _, b, c in storage_parts(shape, fmt))
    return size + (4 if fmt.scaling.tensor_scale else 0)
