"""The cast engine's own invariants (the formats' values are checked by the battery and the references)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import adversarial_blocks, assert_bitwise

from numcast.formats.element import arithmetic_rounding_exact, cast_element
from numcast.formats.engine import grid_cast
from numcast.formats.registry import list_formats

SCALED = [f.name for f in list_formats() if f.scaling.scaled]
ELEMENTS = sorted({f.element.name: f.name for f in list_formats()}.values())
by_name = {f.name: f for f in list_formats()}


def _adversarial(dtype: torch.dtype) -> torch.Tensor:
    with np.errstate(all="ignore"):
        x = torch.from_numpy(adversarial_blocks(128, np.random.default_rng(1))).to(dtype)
    if dtype == torch.float64:  # beyond float32's range too
        x = torch.cat([x, x * 2.0**900, x * 2.0**-900])
    return x


@pytest.mark.parametrize("name", SCALED)
def test_scales_derived_from_the_blocks_leave_no_inf_to_round(name):
    """``grid_cast`` tells the element cast that ``x / s`` holds no ±inf where it derived the scales itself (NaN
    scale for a block holding NaN/inf, else one that maps the block into the grid or, saturated, one ≥ 1): true
    for every scaled format on blocks of every magnitude, NaN and ±inf included, in float32 and float64."""
    fmt = by_name[name]
    if fmt.scaling.scale_format.max < 1.0:
        pytest.skip("a scale format below 1 can overflow x / s; the engine keeps the inf selects there")
    for dtype in (torch.float32, torch.float64):
        x = _adversarial(dtype)
        if fmt.scaling.tensor_scale:  # one inf makes the whole tensor NaN: also the finite blocks alone
            xs = [x, x[torch.isfinite(x).all(dim=1)]]
        else:
            xs = [x]
        for t in xs:
            y = grid_cast(t, fmt).element_input
            assert not torch.isinf(y).any(), f"{name} {dtype}: x / s overflowed"


@pytest.mark.parametrize("saturate", [True, False], ids=["saturate", "overflow"])
@pytest.mark.parametrize(("name", "arithmetic"), [(n, a) for n in ELEMENTS for a in (False, True)
                                                  if not (a and by_name[n].element.kind == "int")])  # fmt: skip
def test_leaving_out_the_inf_selects_keeps_the_bits_of_inputs_without_inf(name, saturate, arithmetic):
    """``cast_element(no_inf=True)`` gives the full cast's bits on values without ±inf, NaN, overflow, ±0 and
    subnormals included (small tensors: the full cast runs its selects rather than checking first)."""
    elem = by_name[name].element  # (integer grids round by torch.round on every path: no arithmetic variant)
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        if arithmetic and not arithmetic_rounding_exact(elem, dtype):
            continue
        beyond = min(elem.max * 4, torch.finfo(dtype).max)
        y = (torch.randn(4096, generator=g, dtype=torch.float64) * torch.exp(torch.randn(4096, generator=g,
             dtype=torch.float64) * 8)).to(dtype)  # fmt: skip
        y[:4] = torch.tensor([float("nan"), 0.0, -0.0, beyond], dtype=dtype)
        if elem.signed:
            y[4] = -beyond
        else:
            y = y.abs()
        want = cast_element(y, elem, saturate=saturate, arithmetic=arithmetic)
        got = cast_element(y, elem, saturate=saturate, arithmetic=arithmetic, no_inf=True)
        assert_bitwise(got, want, f"{name} {dtype}")
