"""The column quantizer with shared microexponents (MX9/MX6/MX4 and a user format with other sub-blocks): both
scale levels (the block's shared exponent and every sub-block's offset) are fixed before a block's first column
is rounded, from the float weights (static) or the current columns (dynamic); without updates it is RTN; GPTQ
and Error Diffusion results lie on the format's grid and beat RTN."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_bitwise

from numcast.algorithms.columns import ColumnQuantizer
from numcast.algorithms.error_diffusion import error_diffusion
from numcast.algorithms.gptq import gptq, hessian
from numcast.algorithms.rtn import rtn
from numcast.formats.ops import cast, quantize
from numcast.formats.registry import get_format
from numcast.formats.spec import E8M0, Format, IntElement, Scaling

USER = Format(IntElement(4, True, True, 2), Scaling("block", 32, -1, E8M0, "floor", sub_block_size=4,
                                                    sub_offset_bits=2), name="user_k32_s4_d2")  # fmt: skip
FORMATS = {"mx9": get_format("mx9"), "mx6": get_format("mx6"), "mx4": get_format("mx4"), "user": USER}
RULES = ["dynamic", "static"]


def quantize_columns(cq: ColumnQuantizer, current: torch.Tensor) -> torch.Tensor:
    """Every column of ``current`` [out, in] through ``cq`` in order, a block's scales fixed (dynamic rule) from
    ``current``'s columns of that block."""
    cols = []
    for j in range(current.shape[1]):
        if cq.needs_scales(j):
            cq.fix_block(j, current[:, j : j + cq.block])
        cols.append(cq.quantize(current[:, j], j))
    return torch.stack(cols, dim=1)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("name", list(FORMATS))
def test_without_updates_the_column_quantizer_is_rtn(name, rule):
    fmt = FORMATS[name]
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 200, generator=g) * torch.exp(2 * torch.randn(24, 200, generator=g))  # 200: a short block
    cq = ColumnQuantizer(w, fmt, scale_rule=rule)
    got = quantize_columns(cq, w)
    ref = quantize(w, fmt)
    assert_bitwise(got, ref.dequantize(), f"{name} {rule}")
    qt = cq.qtensor()
    assert_bitwise(qt.dequantize(), got, f"{name} {rule}: qtensor")
    assert torch.equal(qt.scale_codes, ref.scale_codes) and torch.equal(qt.sub_offsets, ref.sub_offsets)


@pytest.mark.parametrize("name", ["mx9", "mx6", "mx4"])
def test_both_levels_come_from_the_float_weights_static_or_the_current_columns_dynamic(name):
    """Float weights with magnitudes in [1, 1.9] (E = 0, every τ = 0); by the time the block is reached, its
    columns 2–3 (sub-block 1) shrank to a quarter (their own offset would be 1) and column 0 grew to 5.5 (the
    block's exponent would be 2). Static keeps E = 0, τ = 0 (column 0 saturates, columns 2–3 round on the coarse
    grid); dynamic takes E = 2 and τ = 1 for sub-block 1 — each checked against the closed form
    ±min(rint(|c|/step), 2^m − 1)·step."""
    m = get_format(name).element.mbits
    g = torch.Generator().manual_seed(2)
    w = (1 + 0.9 * torch.rand(8, 16, generator=g)) * torch.where(torch.rand(8, 16, generator=g) < 0.5, -1.0, 1.0)
    current = w.clone()
    current[:, 2:4] *= 0.25
    current[:, 0] = 5.5
    c = current.double().numpy()

    def on_grid(cols: np.ndarray, step: float) -> torch.Tensor:
        return torch.from_numpy(np.sign(cols) * np.minimum(np.rint(np.abs(cols) / step), 2**m - 1) * step + 0.0).float()

    for rule, e, tau1 in (("static", 0, 0), ("dynamic", 2, 1)):
        cq = ColumnQuantizer(w, get_format(name), scale_rule=rule)
        got = quantize_columns(cq, current)
        qt = cq.qtensor()
        assert (qt.scale_codes.long() == 127 + e).all(), rule
        expect_tau = torch.zeros(8, 8, dtype=torch.long)
        expect_tau[:, 1] = tau1
        if rule == "dynamic":  # sub-blocks 2..7 lie two binades below E = 2: they shift by the 1 bit they have
            expect_tau[:, 2:] = 1
        assert torch.equal(qt.sub_offsets.long(), expect_tau), rule
        step = 2.0 ** (e - (m - 1))
        assert_bitwise(got[:, :2], on_grid(c[:, :2], step), f"{name} {rule}: sub-block 0")
        assert_bitwise(got[:, 2:4], on_grid(c[:, 2:4], step / 2**tau1), f"{name} {rule}: sub-block 1")
        assert_bitwise(qt.dequantize(), got, f"{name} {rule}: qtensor")
        if rule == "dynamic":
            assert_bitwise(got, cast(current, name), f"{name}: dynamic = RTN of the current columns")


def correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Tokens whose features are strongly correlated (a low-rank mix plus noise), as real activations are."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, d // 4, generator=g) @ torch.randn(d // 4, d, generator=g)
    return mix + 0.1 * torch.randn(n, d, generator=g)


@pytest.mark.parametrize("name", list(FORMATS))
def test_gptq_lands_on_the_grid_and_beats_rtn(name):
    fmt = FORMATS[name]
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(3))
    x = correlated_inputs(2048, 256)
    err_rtn = ((rtn(w, fmt).dequantize() - w) @ x.T).square().mean()
    for act_order in (False, True):  # dynamic and static block scales
        res = gptq(w, hessian(x), fmt, act_order=act_order)
        assert res.qtensor.format == fmt
        assert_bitwise(res.qtensor.dequantize(), res.weight, f"{name}: QTensor == weight")
        assert_bitwise(cast(res.weight, fmt), res.weight, f"{name}: on the grid")
        err = ((res.weight - w) @ x.T).square().mean()
        assert err < 0.8 * err_rtn, f"{name} act_order={act_order}: GPTQ {err:.4g} vs RTN {err_rtn:.4g}"


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("name", list(FORMATS))
def test_error_diffusion_lands_on_the_grid_and_beats_rtn(name, rule):
    fmt = FORMATS[name]
    g = torch.Generator().manual_seed(4)
    a = torch.randn(512, 64, generator=g) @ torch.randn(64, 256, generator=g)
    a = a + 0.3 * torch.randn(512, 256, generator=g)
    w = 0.1 * torch.randn(32, 256, generator=g)
    gram = a.double().T @ a.double()
    res = error_diffusion(w, gram, gram, fmt, scale_rule=rule)
    assert_bitwise(res.qtensor.dequantize(), res.weight, f"{name} {rule}: QTensor == weight")
    assert_bitwise(cast(res.weight, fmt), res.weight, f"{name} {rule}: on the grid")
    ref = a.double() @ w.double().T

    def err(q: torch.Tensor) -> float:
        return float((a.double() @ q.double().T - ref).square().sum())

    assert err(res.weight) < 0.8 * err(rtn(w, fmt).dequantize()), f"{name} {rule}"
