"""Format figures from the specs, and invalid parameters refused with a reason."""

from __future__ import annotations

import math

import pytest

from numcast.formats.registry import get_format
from numcast.formats.spec import E8M0, FP16, FloatElement, Format, IntElement, Scaling

# (name, max, min normal, min subnormal, mantissa bits) from the OCP OFP8/MX specs and IEEE 754
SPEC_FIGURES = [
    ("fp8_e4m3", 448.0, 2.0**-6, 2.0**-9, 3),
    ("fp8_e5m2", 57344.0, 2.0**-14, 2.0**-16, 2),
    ("fp8_e4m3fnuz", 240.0, 2.0**-7, 2.0**-10, 3),
    ("fp8_e5m2fnuz", 57344.0, 2.0**-15, 2.0**-17, 2),
    ("fp6_e2m3", 7.5, 1.0, 0.125, 3),
    ("fp6_e3m2", 28.0, 0.25, 0.0625, 2),
    ("fp4_e2m1", 6.0, 1.0, 0.5, 1),
    ("fp16", 65504.0, 2.0**-14, 2.0**-24, 10),
    ("bf16", (2 - 2**-7) * 2.0**127, 2.0**-126, 2.0**-133, 7),
    ("e8m0", 2.0**127, 2.0**-127, 2.0**-127, 0),
    ("mxint8", 127 / 64, 2.0**-6, 2.0**-6, 7),
    # Rouhani et al. (ISCA 2023): sign + 7/4/2-bit magnitudes P, P·2^−(m−1) in units of the sub-block's scale
    ("mx9", 127 / 64, 2.0**-6, 2.0**-6, 7),
    ("mx6", 15 / 8, 2.0**-3, 2.0**-3, 4),
    ("mx4", 3 / 2, 2.0**-1, 2.0**-1, 2),
]


@pytest.mark.parametrize("name,fmax,fmin_n,fmin_s,mbits", SPEC_FIGURES)
def test_figures_from_the_specs(name, fmax, fmin_n, fmin_s, mbits):
    e = get_format(name).element
    assert (e.max, e.min_normal, e.min_subnormal, e.mbits) == (fmax, fmin_n, fmin_s, mbits)


@pytest.mark.parametrize(
    "name,bpv",
    [("mxfp4", 4.25), ("mxfp8_e4m3", 8.25), ("mxfp6_e2m3", 6.25), ("nvfp4", 4.5), ("int4_g128", 4.125),
     ("bfp8_b16", 8.5), ("uint4_g128_zp", 4 + 20 / 128), ("int8", 8.0), ("fp16", 16.0),
     ("mx9", 8 + 8 / 16 + 1 / 2), ("mx6", 5 + 8 / 16 + 1 / 2), ("mx4", 3 + 8 / 16 + 1 / 2)],
)  # fmt: skip
def test_bits_per_value(name, bpv):
    assert get_format(name).bits_per_value == bpv


def test_formats_are_hashable_and_comparable():
    a, b = get_format("mxfp4"), get_format("mxfp4")
    assert a == b and hash(a) == hash(b)
    assert len({get_format(n) for n in ("mxfp4", "mxfp4", "nvfp4")}) == 2
    assert Format.from_json(a.to_json()) == a


def test_int_ranges():
    assert (IntElement(8).qmin, IntElement(8).qmax) == (-128, 127)
    assert IntElement(8, narrow=True).qmin == -127
    assert (IntElement(4, signed=False).qmin, IntElement(4, signed=False).qmax) == (0, 15)


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: FloatElement(0, 3), "exponent bits"),
        (lambda: FloatElement(9, 3), "exponent bits"),
        (lambda: FloatElement(4, 24), "mantissa bits"),
        (lambda: FloatElement(4, 3, policy="weird"), "policy"),
        (lambda: IntElement(17), "bits must be"),
        (lambda: IntElement(1), "bits must be"),
        (lambda: IntElement(4, signed=False, narrow=True), "narrow"),
        (lambda: Scaling("block", 0), "block size"),
        (lambda: Scaling("block", None), "block size"),
        (lambda: Scaling("tensor", 32), "only meaningful"),
        (lambda: Scaling("block", 32, scale_format=FP16, rule="floor"), "power-of-two"),
        (lambda: Scaling("channel", tensor_scale=True), "two-level"),
        (lambda: Format(IntElement(4), Scaling("block", 32, zero_point=True)), "zero point"),
        (lambda: Format(IntElement(4), rounding="banker"), "rounding"),
        (lambda: Format(E8M0, Scaling("tensor")), "cannot be scaled"),
    ],
)
def test_invalid_parameters_raise_value_error(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_fp32_is_a_format_and_identity_on_float32():
    import torch

    from numcast.formats.ops import cast

    x = torch.randn(1000) * torch.exp(torch.randn(1000) * 20)
    assert torch.equal(cast(x, "fp32"), x)
    assert get_format("fp32").element.max == float(torch.finfo(torch.float32).max)
    assert math.isclose(get_format("fp32").bits_per_value, 32)
