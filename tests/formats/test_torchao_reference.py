"""A second independent reference: torchao's MX emulation (MXTensor, OCP floor scale rule).

Two documented disagreements are excluded from the comparison (the OCP numpy reference in
test_block_reference.py covers those blocks): torchao halves results in blocks whose amax is a float32
subnormal or near it (a block holding exactly 2^-126 dequantizes to 2^-127 there, 2^-126 here and in the
spec), and torchao keeps the finite neighbours of an inf while numcast makes the whole block NaN."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import adversarial_blocks, assert_bitwise

from numcast.formats.ops import cast

mx_tensor = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor", reason="torchao is a test extra")

ELEMENTS = {
    "mxfp8_e4m3": torch.float8_e4m3fn,
    "mxfp8_e5m2": torch.float8_e5m2,
    "mxfp6_e2m3": "fp6_e2m3",
    "mxfp6_e3m2": "fp6_e3m2",
    "mxfp4": torch.float4_e2m1fn_x2,
}


@pytest.mark.parametrize("name", sorted(ELEMENTS))
def test_mx_equals_torchao(name):
    rng = np.random.default_rng(11)
    with np.errstate(all="ignore"):
        adv = adversarial_blocks(32, rng)
    amax = np.abs(adv).max(axis=1)
    adv = adv[np.isfinite(adv).all(axis=1) & (amax > 1e-30)]
    scale = np.exp(rng.uniform(-10, 10, (256, 1)))
    x = np.concatenate([adv, (rng.standard_normal((256, 32)) * scale)]).astype(np.float32)
    xt = torch.from_numpy(x)
    ref = mx_tensor.MXTensor.to_mx(xt, ELEMENTS[name], 32).dequantize(torch.float32)
    assert_bitwise(cast(xt, name), ref, name)
