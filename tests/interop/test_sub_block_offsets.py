"""Exporters refuse formats with sub-block exponent offsets (shared microexponents): no target stores them."""

from __future__ import annotations

from numcast.formats.registry import get_format
from numcast.formats.spec import E8M0, FloatElement, Format, Scaling


def test_exporters_refuse_sub_block_offsets():
    """No exporter target has sub-block exponent offsets: each must refuse such a format rather than write its
    codes and block scales without the offsets (other values)."""
    from numcast.interop.gguf_tensors import gguf_type
    from numcast.interop.to_compressed_tensors import ct_scheme

    fp4 = Format(FloatElement(2, 1, 1, "finite"), Scaling("block", 32, -1, E8M0, "floor", sub_block_size=2,
                                                          sub_offset_bits=1))  # fmt: skip
    for fmt in [*(get_format(n) for n in ("mx9", "mx6", "mx4")), fp4]:
        assert gguf_type(fmt)[0] is None, fmt.label
        assert ct_scheme(fmt)[0] is None, fmt.label


