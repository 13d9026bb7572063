"""numcast QTensors as GGUF blocks, proven by the reader: ``gguf.quants.dequantize`` (PyPI gguf, llama.cpp's Python
reference) of every packed tensor equals numcast's dequantized weight bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_bitwise

from numcast.formats.ops import quantize
from numcast.interop.gguf_tensors import pack_gguf

gguf = pytest.importorskip("gguf")


def weight(shape=(12, 256), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    w[torch.rand(shape, generator=g) < 0.01] *= 40  # outliers: blocks with very different scales
    w[3, :64] = 0.0  # an all-zero block
    return w


@pytest.mark.parametrize("fmt, ggml", [("int4_g32", "Q4_0"), ("int4_g64", "Q4_0"), ("int4_g128", "Q4_0"),
                                       ("int8_g32", "Q8_0"), ("int8_g64", "Q8_0"), ("mxfp4", "MXFP4"),
                                       ("nvfp4", "NVFP4")])  # fmt: skip
def test_the_reader_decodes_numcasts_weights_bit_for_bit(fmt, ggml):
    qt = quantize(weight(), fmt)
    t = pack_gguf(qt, "w")
    assert t.type_name == ggml and t.ggml_type == int(getattr(gguf.GGMLQuantizationType, ggml))
    block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t.ggml_type)]
    assert t.data.dtype == np.uint8 and t.data.shape == (12, 256 // block * nbytes)
    got = gguf.quants.dequantize(t.data, gguf.GGMLQuantizationType(t.ggml_type)).reshape(12, 256)
    if t.tensor_scale is not None:  # llama.cpp applies NVFP4's FP32 tensor scale after the matmul
        got = got * np.float32(t.tensor_scale)
    # bit for bit, up to the sign of zero: ggml's E2M1 table decodes the −0 code as +0 (x + 0.0 maps −0 to +0)
    assert_bitwise(torch.from_numpy(np.ascontiguousarray(got)) + 0.0, qt.dequantize() + 0.0, fmt)


@pytest.mark.parametrize("fmt, msg", [("int4_channel", "needs one FP16 scale per group"), ("int4_g16", "don't tile"),
                                      ("mxfp8_e4m3", "no GGUF block type"), ("uint4_g128_zp", "no GGUF block type"),
                                      ("int3_g64", "no GGUF block type")])  # fmt: skip
def test_formats_gguf_cannot_store_are_refused_by_name(fmt, msg):
    with pytest.raises(ValueError, match=f"layer.0: .*{msg}"):
        pack_gguf(quantize(weight(), fmt), "layer.0")


def test_partial_blocks_and_nan_blocks_are_refused():
    with pytest.raises(ValueError, match="not whole NVFP4 blocks of 64"):
        pack_gguf(quantize(weight((4, 96)), "nvfp4"), "w")
    w = weight()
    w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        pack_gguf(quantize(w, "mxfp4"), "w")
