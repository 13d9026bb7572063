"""Scale rules' building blocks (the formats' scales themselves are checked against the specs by the battery and
the block references)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers import assert_bitwise

from numcast.formats.ops import cast
from numcast.formats.registry import get_format, list_formats
from numcast.formats.scale import Scales, compute_scales, row_amax


def test_eager_row_amax_equals_the_max_of_absolute_values():
    """Eager ``row_amax`` (a max and a min reduction, no |x| temporary) gives ``max |x|`` per row bit for bit:
    +0 for rows of ±0, NaN wherever a NaN is, inf for ±inf, the largest magnitude of either sign — the compiled
    path's ``abs().amax``."""
    special = [0.0, -0.0, math.nan, math.inf, -math.inf, 5.0, -7.0, 1e-45, -1e-45, 3.4e38, -3.4e38]
    rows = torch.tensor([[a, b] for a in special for b in special], dtype=torch.float32)
    rows = torch.cat([rows, torch.randn(64, 2, generator=torch.Generator().manual_seed(0))])
    for t in (rows, rows.double(), torch.randn(33, 32, generator=torch.Generator().manual_seed(1))):
        assert_bitwise(row_amax(t), t.abs().amax(dim=-1))


@pytest.mark.parametrize("name", [f.name for f in list_formats() if not f.scaling.tensor_scale])
def test_a_finite_input_never_casts_to_inf(name):
    """Rows whose amax is float32's largest value or its neighbour below: the cast is finite and idempotent.
    int8_channel once gave inf there (its FP32 scale amax/127 rounded up, so 127·s passed 3.4e38; the scale now
    takes the FP32 value below)."""
    fmt = get_format(name)
    top = torch.finfo(torch.float32).max
    below = math.nextafter(top, 0.0)
    x = torch.tensor([[top, -1.0, below, 2.0] * 8, [-top, 1.0, -below, -2.0] * 8])
    unsigned = fmt.element.kind == "int" and not fmt.element.signed and not fmt.scaling.scaled
    if unsigned or fmt.element.kind == "float" and fmt.element.policy == "fnu":
        x = x.abs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # FP16 group scales saturating: their own warning
        y = cast(x, name)
        assert bool(torch.isfinite(y).all()), f"{name}: {y[:, :4]}"
        assert_bitwise(cast(y, name), y, name)


POW2_ROWS = [f.name for f in list_formats()
             if f.scaling.scaled and f.scaling.rule not in ("amax", "signed_max") and not f.scaling.sub_block_size]


@pytest.mark.parametrize("name", POW2_ROWS)
def test_the_reciprocal_made_beside_power_of_two_scales_is_exact(name):
    """``compute_scales`` gives power-of-two scales their reciprocal in the rows' dtype (what the compiled element
    kernel reads instead of dividing): 1/s exactly, so s · (1/s) = 1 on every finite row down to E8M0's 2^-127,
    NaN on a non-finite row: the bits ``Scales.reciprocal`` divides out for scales that come without it."""
    fmt = get_format(name)
    sc = fmt.scaling
    block = sc.block_size if sc.granularity == "block" else 8
    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(64, block, generator=gen) * torch.logspace(-38, 38, 64)[:, None]
    rows[5, 0], rows[9, 1] = math.nan, math.inf
    s = compute_scales(rows, fmt.element, sc)
    assert s.inverse is not None and s.inverse.dtype == rows.dtype
    finite = torch.isfinite(s.scale)
    assert not finite[5] and not finite[9] and s.inverse[~finite].isnan().all()
    assert (s.scale[finite] * s.inverse[finite].double() == 1.0).all(), name
    afresh = Scales(s.scale)
    assert afresh.reciprocal(torch.float32).dtype == torch.float32
    assert_bitwise(s.reciprocal(torch.float32), afresh.reciprocal(torch.float32))
    assert s.reciprocal(torch.float64).dtype == torch.float64  # a reciprocal of another dtype is not taken
