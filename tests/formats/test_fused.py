"""The compiled backend is the eager arithmetic fused: it must agree bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import adversarial_blocks, assert_bitwise

from numcast.formats.ops import cast

FUSED = ["mxfp4", "mxfp8_e4m3", "mxint8", "nvfp4", "int4_g128", "fp8_e4m3", "mxfp6_e2m3"]


@pytest.mark.parametrize("name", FUSED)
def test_compiled_equals_eager(name):
    rng = np.random.default_rng(0)
    with np.errstate(all="ignore"):
        adv = adversarial_blocks(32, rng)
    x = torch.cat([torch.from_numpy(adv), torch.randn(64, 32) * 3]).reshape(-1, 128)
    if name == "nvfp4":
        x = x[torch.isfinite(x).all(dim=1)]  # one inf would make the whole tensor NaN
    for mode in ("nearest_even", "toward_zero"):
        assert_bitwise(cast(x, name, rounding=mode, backend="compiled"), cast(x, name, rounding=mode), name)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend"):
        cast(torch.zeros(4), "int8", backend="fast")
