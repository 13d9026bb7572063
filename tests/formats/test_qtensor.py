"""QTensor storage: bit packing at every width, sizes, safetensors errors."""

from __future__ import annotations

import pytest
import torch

from numcast.formats.ops import cast, quantize
from numcast.formats.packing import pack_bits, packed_nbytes, unpack_bits
from numcast.formats.qtensor import PackedQTensor, QTensor
from numcast.formats.registry import get_format


@pytest.mark.parametrize("bits", list(range(1, 17)) + [32])
@pytest.mark.parametrize("n", [1, 7, 64, 1001])
def test_pack_unpack_round_trip_every_width(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (n,), generator=g, dtype=torch.int64)
    data = pack_bits(codes, bits)
    assert len(data) == packed_nbytes(n, bits) == (n * bits + 7) // 8
    assert torch.equal(unpack_bits(data, bits, n), codes)


def test_pack_layout_is_lsb_first():
    assert pack_bits(torch.tensor([1, 2]), 4) == bytes([0x21])  # element 0 in the low nibble
    assert pack_bits(torch.tensor([0b111, 0b001, 0b010]), 3) == bytes([0b10001111, 0b0])


def test_mxfp4_is_4_25_bits_per_value():
    qt = quantize(torch.randn(4096, 4096), "mxfp4")
    assert qt.nbytes == 4096 * 4096 // 2 + 4096 * 4096 // 32
    assert qt.bits_per_value == 4.25


def test_unpack_rejects_wrong_length():
    qt = quantize(torch.randn(4, 32), "mxfp4")
    with pytest.raises(ValueError, match="needs"):
        QTensor.unpack(qt.pack()[:-1], qt.format, qt.shape)


def test_save_refuses_to_overwrite(tmp_path):
    qt = quantize(torch.randn(4, 32), "mxfp4")
    p = tmp_path / "a.safetensors"
    qt.save(p)
    with pytest.raises(FileExistsError, match="overwrite"):
        qt.save(p)
    qt.save(p, overwrite=True)


def test_truncated_or_foreign_files_name_the_file(tmp_path):
    qt = quantize(torch.randn(8, 64), "nvfp4")
    p = tmp_path / "t.safetensors"
    qt.save(p)
    data = p.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[:-7])
    with pytest.raises(ValueError, match="truncated.safetensors"):
        QTensor.load(bad)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign))
    with pytest.raises(ValueError, match="foreign.safetensors"):
        QTensor.load(foreign)


def test_scales_and_codes_shapes():
    x = torch.randn(3, 5, 70)
    qt = quantize(x, "mxfp8_e4m3")
    assert qt.codes.shape == x.shape and qt.codes.dtype == torch.uint8
    assert qt.scale_codes.shape == (3, 5, 3)
    qt = quantize(x, "int8_channel")
    assert qt.scale_codes.shape == (3,)
    assert qt.dequantize().dtype == torch.float32


def test_nan_in_a_format_without_nan_code_is_refused_by_quantize():
    x = torch.tensor([1.0, float("nan")])
    assert torch.isnan(cast(x, "fp4_e2m1"))[1]
    with pytest.raises(ValueError, match="no NaN code"):
        quantize(x, "fp4_e2m1")
    # in a scaled format the NaN lives in the scale (E8M0 0xFF): encodable
    qt = quantize(torch.tensor([[1.0] * 31 + [float("nan")]]), "mxfp4")
    assert qt.scale_codes.item() == 255 and torch.isnan(qt.dequantize()).all()


def test_dequantize_keeps_input_dtype():
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    qt = quantize(x, "mxfp8_e4m3")
    assert qt.dequantize().dtype == torch.bfloat16
    assert torch.equal(qt.dequantize(), cast(x, get_format("mxfp8_e4m3")))


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "int4_g32", "uint4_g128_zp", "mx6", "mxfp6_e3m2"])
def test_packed_qtensor_gives_the_tensor_back_bit_for_bit_in_its_packed_size(fmt):
    """PackedQTensor holds the true bit widths (QTensor.nbytes) and unpacks to the same codes, scales, zero
    points and offsets, dtypes included."""
    x = torch.randn(24, 300, generator=torch.Generator().manual_seed(3), dtype=torch.float64).float()
    qt = quantize(x, fmt)
    packed = PackedQTensor.of(qt)
    assert len(packed.data) == qt.nbytes < qt.codes.numel() * qt.codes.element_size()
    back = packed.unpack()
    for name in ("codes", "scale_codes", "zero_point", "sub_offsets"):
        a, b = getattr(qt, name), getattr(back, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and torch.equal(a, b), name
    assert back.tensor_scale == qt.tensor_scale and back.shape == qt.shape and back.dtype == qt.dtype
    assert torch.equal(back.dequantize(), qt.dequantize())
