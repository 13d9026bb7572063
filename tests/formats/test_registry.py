"""The name grammar, the registry and its errors."""

from __future__ import annotations

import pytest
import torch

from numcast.formats.ops import cast
from numcast.formats.registry import get_format, list_formats, parse_format, register_format
from numcast.formats.spec import E4M3, E8M0, FP16, FloatElement, Format, IntElement, Scaling

REQUIRED = [*[f"int{b}" for b in range(2, 9)], *[f"uint{b}" for b in range(2, 9)], "fp8_e4m3", "fp8_e5m2",
            "fp8_e4m3fnuz", "fp8_e5m2fnuz", "fp6_e2m3", "fp6_e3m2", "fp4_e2m1", "e8m0", "bf16", "fp16",
            "mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp4", "mxint8", "nvfp4",
            "mx9", "mx6", "mx4"]  # fmt: skip


def test_registry_has_every_required_name():
    names = {f.name for f in list_formats()}
    assert set(REQUIRED) <= names


def test_every_registered_name_reparses_to_the_same_format():
    for f in list_formats():
        assert parse_format(f.name) == f, f.name


def test_grammar():
    assert get_format("int4_g128") == Format(IntElement(4), Scaling("block", 128, -1, FP16, "amax"))
    assert get_format("int8_channel").scaling.granularity == "channel"
    assert get_format("intn8").element.narrow
    assert get_format("e3m4").element == FloatElement(3, 4, 3, "ieee")
    assert get_format("fp6_e2m3").element.policy == "finite"
    assert get_format("fp8_e4m3").element.policy == "fn"
    assert get_format("e4m3b11fnuz").element == FloatElement(4, 3, 11, "fnuz")
    assert get_format("mxfp4_b16").block_size == 16
    assert get_format("bfp12_b64").element == IntElement(12, True, True, 10)
    assert get_format("uint4_g64_zp").scaling.zero_point
    assert get_format("MX6") == Format(IntElement(5, True, True, 3), Scaling("block", 16, -1, E8M0, "floor",
                                                                            sub_block_size=2, sub_offset_bits=1))
    nv = get_format("NVFP4")
    assert nv.scaling.scale_format == E4M3 and nv.scaling.tensor_scale and nv.block_size == 16


@pytest.mark.parametrize(
    "bad,hint", [("mxfp5", "mxfp4"), ("nvfp8", "nvfp4"), ("int4_g", "int4"), ("fp8-e4m3", "fp8_e4m3")]
)
def test_unknown_name_lists_closest(bad, hint):
    with pytest.raises(ValueError, match="unknown format") as err:
        get_format(bad)
    assert hint in str(err.value)


def test_bad_names_with_reasons():
    with pytest.raises(ValueError, match="does not match"):
        get_format("fp8_e4m2")
    with pytest.raises(ValueError, match="bits must be"):
        get_format("int17")
    with pytest.raises(ValueError, match="block size"):
        get_format("int4_g0")
    with pytest.raises(ValueError, match="zero point"):
        get_format("int4_g128_zp")
    with pytest.raises(TypeError):
        get_format(4)


def test_register_user_format_joins_the_list_and_refuses_silent_overwrite():
    fmt = Format(FloatElement(3, 2, 3, "finite"), Scaling("block", 8, -1, FP16, "amax"))
    try:
        registered = register_format("my_fp6_b8", fmt)
        assert registered.name == "my_fp6_b8" and registered in list_formats()
        x = torch.randn(4, 8)
        assert torch.equal(cast(x, "my_fp6_b8"), cast(x, fmt))
        with pytest.raises(ValueError, match="already registered"):
            register_format("my_fp6_b8", fmt)
        register_format("my_fp6_b8", fmt, overwrite=True)
    finally:
        from numcast.formats import registry

        registry._REGISTRY.pop("my_fp6_b8", None)
