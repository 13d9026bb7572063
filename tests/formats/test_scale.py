"""Scale rules' building blocks (the formats' scales themselves are checked against the specs by the battery and
the block references)."""

from __future__ import annotations

import math

import torch
from helpers import assert_bitwise

from numcast.formats.scale import row_amax


def test_eager_row_amax_equals_the_max_of_absolute_values():
    """Eager ``row_amax`` (a max and a min reduction, no |x| temporary) gives ``max |x|`` per row bit for bit:
    +0 for rows of ±0, NaN wherever a NaN is, inf for ±inf, the largest magnitude of either sign — the compiled
    path's ``abs().amax``."""
    special = [0.0, -0.0, math.nan, math.inf, -math.inf, 5.0, -7.0, 1e-45, -1e-45, 3.4e38, -3.4e38]
    rows = torch.tensor([[a, b] for a in special for b in special], dtype=torch.float32)
    rows = torch.cat([rows, torch.randn(64, 2, generator=torch.Generator().manual_seed(0))])
    for t in (rows, rows.double(), torch.randn(33, 32, generator=torch.Generator().manual_seed(1))):
        assert_bitwise(row_amax(t), t.abs().amax(dim=-1))
