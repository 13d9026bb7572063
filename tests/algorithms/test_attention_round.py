"""Attention Round: on the grid, RTN when σ starts at 0, better than RTN on a correlated layer, the K-nearest
restriction equal to the full grid when it covers it, seeded sampling; the soft weights and their gradient equal
the paper's softmax over every attended level (float64 autograd reference); the block reconstruction's
mini-batches (seeded, never the global RNG, a fixed size whatever the calibration set) and its batch-norm
folding (the same function of the weights)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from numcast.algorithms.attention_round import (
    AttentionRounder,
    MiniBatches,
    attended_levels,
    attention_round,
    element_grid,
    fold_batch_norms,
    layer_output_loss,
    round_block,
)
from numcast.formats.engine import grid_cast
from numcast.formats.ops import quantize
from numcast.formats.registry import get_format

FORMATS = ["int4_channel", "int3_channel", "int2_g64", "mxfp4", "nvfp4", "mxfp6_e2m3", "int4_g128", "fp8_e4m3"]


def layer(seed=0, out=16, k=128, n=512):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, k, generator=g) * 0.1
    x = torch.randn(n, 8, generator=g) @ torch.randn(8, k, generator=g) + 0.3 * torch.randn(n, k, generator=g)
    return w, x.T @ x / n


@pytest.mark.parametrize("fmt", FORMATS)
def test_result_is_a_member_of_the_format_with_the_same_scales(fmt):
    w, h = layer(1)
    res = attention_round(w, fmt, layer_output_loss(w, h), iterations=30)
    assert torch.equal(res.qtensor.dequantize(), res.weight)
    again = grid_cast(res.weight, get_format(fmt), scales=grid_cast(w, get_format(fmt)).scales)
    assert torch.equal(again.output(w.shape, w.dtype), res.weight)  # re-quantizing with the scales: unchanged


@pytest.mark.parametrize("fmt", FORMATS)
def test_sigma_near_zero_from_the_start_is_rtn(fmt):
    w, h = layer(2)
    res = attention_round(w, fmt, layer_output_loss(w, h), iterations=20, sigma_start=1e-4, sigma_end=1e-4)
    assert torch.equal(res.weight, quantize(w, fmt).dequantize())


@pytest.mark.parametrize("fmt", ["int4_channel", "int3_channel", "int2_g64", "mxfp4", "nvfp4"])
def test_reconstruction_error_below_rtn_on_correlated_inputs(fmt):
    w, h = layer(3)
    loss = layer_output_loss(w, h)
    res = attention_round(w, fmt, loss, iterations=300)
    rtn = float(loss(quantize(w, fmt).dequantize()))
    assert float(loss(res.weight)) < 0.8 * rtn


@pytest.mark.parametrize("fmt", ["int3_channel", "mxfp4", "fp8_e4m3"])
def test_k_nearest_covering_the_grid_equals_the_full_distribution(fmt):
    w, h = layer(4, out=4, k=32)
    n = element_grid(get_format(fmt)).numel()
    full = attention_round(w, fmt, layer_output_loss(w, h), iterations=40, k_nearest=10**6)
    cover = attention_round(w, fmt, layer_output_loss(w, h), iterations=40, k_nearest=n)
    assert torch.equal(full.offsets, cover.offsets) and torch.equal(full.weight, cover.weight)
    default = attention_round(w, fmt, layer_output_loss(w, h), iterations=40)  # the whole grid up to 16 levels
    same = full if n <= 16 else attention_round(w, fmt, layer_output_loss(w, h), iterations=40, k_nearest=8)
    assert torch.equal(default.offsets, same.offsets) and torch.equal(default.weight, same.weight)
    near = attention_round(w, fmt, layer_output_loss(w, h), iterations=40, k_nearest=2)
    assert near.weight.shape == w.shape


def test_sampled_variant_is_seeded():
    w, h = layer(5, out=8, k=64)
    a = attention_round(w, "int4_channel", layer_output_loss(w, h), iterations=50, variant="sampled", seed=1)
    b = attention_round(w, "int4_channel", layer_output_loss(w, h), iterations=50, variant="sampled", seed=1)
    c = attention_round(w, "int4_channel", layer_output_loss(w, h), iterations=50, variant="sampled", seed=2)
    assert torch.equal(a.offsets, b.offsets) and not torch.equal(a.offsets, c.offsets)
    state = torch.random.get_rng_state()
    attention_round(w, "int4_channel", layer_output_loss(w, h), iterations=5, variant="sampled")
    assert torch.equal(state, torch.random.get_rng_state())


def test_time_budget_stops_early():
    w, h = layer(6)
    res = attention_round(w, "int4_channel", layer_output_loss(w, h), iterations=100_000, time_budget_s=0.2)
    assert 0 < res.iterations < 100_000


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(variant="gumbel"), "variant"),
        (dict(sigma_start=0.0), "sigma"),
        (dict(k_nearest=0), "k_nearest"),
    ],
)
def test_refusals(kw, match):
    w, h = layer(7, out=2, k=32)
    with pytest.raises(ValueError, match=match):
        attention_round(w, "int4_channel", layer_output_loss(w, h), **kw)
    with pytest.raises(ValueError, match="zero points"):
        attention_round(w, "uint4_g128_zp", layer_output_loss(w, h))
    with pytest.raises(ValueError, match="NaN"):
        attention_round(torch.full((2, 4), float("nan")), "int4_channel", lambda x: x.sum())


# ---- the soft weights against the paper's formula -------------------------------------------------------------------


def reference_soft(r: AttentionRounder, fmt: str, sigma: float, k_nearest: int | None):
    """ū·s and dū/dδ from the plain formula in float64 with autograd: p = softmax over the weight's attended
    levels (the whole grid, or the k levels nearest to u by brute force) of −(u + δ − g)²/(2σ²Δ²), Δ the spacing
    of u's two neighbouring levels."""
    grid = element_grid(get_format(fmt))
    u = r.u
    k = attended_levels(k_nearest, grid.numel())
    levels = grid[(u[..., None] - grid).abs().argsort(dim=-1, stable=True)[..., :k]].sort(-1).values
    pos = torch.searchsorted(grid, u.clamp(grid[0], grid[-1]).contiguous()).clamp(1, grid.numel() - 1)
    step = grid[pos] - grid[pos - 1]
    x = (u + r.delta.detach().double()).requires_grad_()
    p = torch.softmax(-((x[..., None] - levels) / step[..., None]).square() / (2 * sigma**2), dim=-1)
    soft = (p * levels).sum(-1)
    soft.sum().backward()
    return soft.detach() * r.s, x.grad, float(grid.abs().max())


@pytest.mark.parametrize("fmt", ["int4_channel", "int2_g64", "mxfp4", "nvfp4", "mxfp6_e2m3", "fp8_e4m3", "fp8_e5m2",
                                 "int8_channel"])  # fmt: skip
@pytest.mark.parametrize("k_nearest", [None, 3])
def test_soft_weights_and_gradient_equal_the_softmax_over_every_attended_level(fmt, k_nearest):
    """Only the few levels with attention above e^-30 of the largest enter a step, and the gradient is the closed
    form: both must equal the plain softmax over all of a weight's levels, with offsets that wander far, some
    beyond the grid."""
    g = torch.Generator().manual_seed(11)
    w = torch.randn(24, 64, generator=g) * 0.1
    r = AttentionRounder(w, fmt, k_nearest=k_nearest)
    with torch.no_grad():
        r.delta.copy_(torch.randn(r.delta.shape, generator=g) * 3)
    for sigma in (0.5, 0.2, 0.05):
        got = r.soft(sigma)
        got.sum().backward()
        grad, r.delta.grad = r.delta.grad.clone(), None
        want, want_grad, top = reference_soft(r, fmt, sigma, k_nearest)
        # float32: the resolution of the largest level, and of the logits a·d² with a = 1/(2σ²) (weight units)
        tol = (4e-6 * top + 4e-7 / sigma**2) * float(r.s.max())
        assert float((got.detach().double() - want).abs().max()) <= tol, (fmt, sigma)
        scale = float(want_grad.abs().max())
        assert float((grad.double() / r.s - want_grad).abs().max()) <= 2e-3 * scale + 1e-6, (fmt, sigma)


def test_soft_weights_at_a_tie_attend_both_levels_equally():
    """u + δ exactly between two levels, far from the grid's ends: ū is their midpoint (symmetry) and, once σ is
    small, the slope dū/dδ = Var_p(g)/(σ²Δ²) = (1/4)/σ² (two levels at ±1/2 with p = 1/2 each, Δ = 1)."""
    w = torch.tensor([[0.5, -2.5, 3.5, 1.0, 7.0]])  # int4_channel: scale max|w|/7 = 1, so u = w
    r = AttentionRounder(w, "int4_channel")
    assert torch.equal(r.s, torch.ones_like(r.s))
    with torch.no_grad():
        r.delta.copy_(torch.tensor([[0.0, 0.0, 0.0, 0.5, -0.5]]))  # 1.0 + 0.5 and 7 − 0.5: ties too
    ties = torch.tensor([0.5, -2.5, 3.5, 1.5, 6.5])
    for sigma in (0.5, 0.1, 0.01):
        soft = r.soft(sigma)
        soft.sum().backward()
        grad, r.delta.grad = r.delta.grad.clone(), None
        if sigma == 0.5:  # the levels beyond the pair still carry weight: only the interior midpoints are certain
            assert torch.allclose(soft[0, :4], ties[:4], atol=1e-6)
            continue
        assert torch.allclose(soft[0], ties, atol=1e-6)
        assert torch.allclose(grad[0], torch.full((5,), 0.25 / sigma**2), rtol=1e-4)


# ---- mini-batches ---------------------------------------------------------------------------------------------------


def calibration(n_batches: int, rows: int = 8, seed: int = 0):
    """Batches of distinct samples (row i holds its global index everywhere) and targets 2x + 1 of them."""
    xs = [(torch.arange(b * rows, (b + 1) * rows, dtype=torch.float32)[:, None] + torch.zeros(rows, 5))
          for b in range(n_batches)]  # fmt: skip
    return xs, [2 * x + 1 for x in xs]


def test_mini_batches_are_seeded_pair_inputs_with_targets_and_leave_the_global_rng_alone():
    xs, ts = calibration(6)
    draws = []
    for seed, noise in ((3, 1), (3, 2), (4, 1)):
        torch.manual_seed(noise)  # the global RNG must not matter
        state = torch.random.get_rng_state()
        mb = MiniBatches(lambda i: ((xs[i],), {}), ts, batch_size=5, seed=seed)
        got = [mb.draw() for _ in range(120)]
        assert torch.equal(state, torch.random.get_rng_state())
        draws.append(torch.stack([a[0][:, 0] for a, _, _ in got]))
        for args, kwargs, target in got:
            x = args[0]
            assert x.shape == (5, 5) and kwargs == {}
            assert torch.equal(target, 2 * x + 1)  # every sample keeps its own target
            assert x[:, 0].unique().numel() == 5  # without replacement within a step
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    assert set(draws[0].flatten().long().tolist()) == set(range(48))  # every sample of every batch is reachable
    assert mb.samples == 48 and mb.why_whole is None


@pytest.mark.parametrize("n_batches", [2, 25])
def test_a_step_costs_the_same_whatever_the_number_of_cached_samples(n_batches):
    """Every step runs the block on ``batch_size`` samples, and each calibration batch is read once (to cache its
    tensors), not once per step."""
    xs, ts = calibration(n_batches)
    block = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 5))
    seen, reads = [], []
    block.register_forward_pre_hook(lambda _m, a: seen.append((a[0].shape[0], torch.is_grad_enabled())))

    def inputs(i):
        reads.append(i)
        return (xs[i],), {}

    got = round_block(block, [("0", block[0], "int4_channel"), ("2", block[2], "int4_channel")], inputs, ts,
                      iterations=12, lr=1e-2, sigma_start=0.5, sigma_end=0.01, batch_size=6)  # fmt: skip
    assert [b for b, grad in seen if grad] == [6] * 12
    assert sorted(reads) == list(range(n_batches))
    for name, layer in (("0", block[0]), ("2", block[2])):  # on the grid, with the format's own scales
        again = grid_cast(got[name].dequantize(), get_format("int4_channel"),
                          scales=grid_cast(layer.weight.detach(), get_format("int4_channel")).scales)  # fmt: skip
        assert torch.equal(again.output(layer.weight.shape, torch.float32), got[name].dequantize())


def test_a_batch_size_covering_every_sample_runs_them_all_each_step():
    xs, ts = calibration(3)
    mb = MiniBatches(lambda i: ((xs[i],), {}), ts, batch_size=100)
    for _ in range(3):
        args, _, target = mb.draw()
        assert torch.equal(args[0], torch.cat(xs)) and torch.equal(target, torch.cat(ts))


def test_shared_and_per_sample_arguments_of_a_call():
    """A mask per sample travels with its sample; a table shared by every batch is passed as it is; a keyword
    argument that differs between batches (not per sample) cannot be split: whole batches then, said once."""
    xs, ts = calibration(4)
    table = torch.arange(3.0)
    masks = [x[:, :1] * 10 for x in xs]  # row-aligned with x
    mb = MiniBatches(lambda i: ((xs[i], table), {"mask": masks[i], "flag": True}), ts, batch_size=7, seed=1)
    for _ in range(5):
        (x, tab), kw, target = mb.draw()
        assert tab is table and kw["flag"] is True and torch.equal(kw["mask"], x[:, :1] * 10)
    shifts = [torch.full((2,), float(i)) for i in range(4)]  # one per batch, not per sample
    odd = MiniBatches(lambda i: ((xs[i],), {"shift": shifts[i]}), ts, batch_size=7, seed=1)
    assert odd.why_whole is not None and "differs between batches" in odd.why_whole
    block = Shifted(5, 5)
    seen = []
    block.register_forward_pre_hook(lambda _m, a: seen.append(a[0].shape[0]))
    with pytest.warns(UserWarning, match="do not split by sample"):
        round_block(block, [("", block, "int4_channel")], lambda i: ((xs[i],), {"shift": shifts[i]}), ts,
                    iterations=3, lr=1e-2, sigma_start=0.5, sigma_end=0.01, batch_size=7)  # fmt: skip
    assert seen == [8, 8, 8]  # whole calibration batches


class Shifted(nn.Linear):
    def forward(self, x, shift=None):
        return super().forward(x) + shift.mean()


def test_whole_batches_in_a_seeded_order_every_batch_once_per_epoch():
    xs, ts = calibration(5)
    mb = MiniBatches(lambda i: ((xs[i],), {}), ts, batch_size=None, seed=2)
    assert mb.why_whole == "batch_size is None"
    order = [int(mb.draw()[0][0][0, 0]) // 8 for _ in range(15)]
    for epoch in range(3):
        assert sorted(order[5 * epoch : 5 * epoch + 5]) == list(range(5))
    again = MiniBatches(lambda i: ((xs[i],), {}), ts, batch_size=None, seed=2)
    assert [int(again.draw()[0][0][0, 0]) // 8 for _ in range(15)] == order
    with pytest.raises(ValueError, match="batch_size"):
        MiniBatches(lambda i: ((xs[i],), {}), ts, batch_size=0)


# ---- batch-norm folding ---------------------------------------------------------------------------------------------


class ConvBlock(nn.Module):
    """conv → BN → ReLU6, a depthwise conv → BN, a residual; and a conv whose output also feeds something else."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.body = nn.Sequential(nn.Conv2d(4, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
                                  nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8))  # fmt: skip
        self.side = nn.Conv2d(8, 4, 1)
        self.side_bn = nn.BatchNorm2d(4)
        with torch.no_grad():
            for m in self.modules():
                for p in m.parameters(recurse=False):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                    m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        self.eval()

    def forward(self, x):
        y = self.body(x)
        s = self.side(y)
        return x + self.side_bn(s) + s.mean()  # ``side`` feeds two nodes: not folded


class PaddedConv(nn.Conv2d):
    """Like EfficientNet's ``Conv2dStaticSamePadding``: a fixed asymmetric pad, then the convolution."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.static_padding = nn.ZeroPad2d((0, 1, 1, 0))

    def forward(self, x):
        return super().forward(self.static_padding(x))


class ScaledConv(nn.Conv2d):
    def forward(self, x):
        return 2 * super().forward(x)


def test_batch_norm_folding_is_the_same_function_of_the_weights():
    block = ConvBlock()
    convs = [block.body[0], block.body[3], block.side]
    folded = fold_batch_norms(block, convs)
    assert folded is not None
    names = [n.target for n in folded.graph.nodes if n.op == "call_module"]
    assert "body.1" not in names and "body.4" not in names and "side_bn" in names  # side is used twice
    x = torch.randn(3, 4, 6, 6, generator=torch.Generator().manual_seed(6))
    g = torch.Generator().manual_seed(7)
    params = {f"{n}.weight": torch.randn(m.weight.shape, generator=g) for n, m in
              (("body.0", block.body[0]), ("body.3", block.body[3]), ("side", block.side))}  # fmt: skip
    for p in params.values():
        p.requires_grad_()
    want = functional_call(block, params, (x,))
    got = functional_call(folded, params, (x,))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(got.square().sum(), list(params.values()))
    ref = torch.autograd.grad(want.square().sum(), list(params.values()))
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert block.body[1] in block.modules()  # the block itself is untouched
    pad, odd = PaddedConv(4, 8, 3), ScaledConv(4, 8, 1)  # a conv of another package that pads first: folded;
    for conv in (pad, odd):  # one whose forward does something else: left alone
        seq = nn.Sequential(conv, nn.BatchNorm2d(8)).eval()
        with torch.no_grad():
            seq[1].running_mean.uniform_(-1, 1)
        f = fold_batch_norms(seq, [conv])
        if conv is odd:
            assert f is None
            continue
        with torch.no_grad():
            torch.testing.assert_close(f(x), seq(x), rtol=1e-5, atol=1e-5)
    block.train()
    assert fold_batch_norms(block, convs) is None  # batch statistics: nothing to fold
    assert fold_batch_norms(nn.Sequential(nn.Linear(3, 3)), []) is None


def test_row_masks_travel_with_their_samples():
    """A padded batch's row mask is drawn with its samples (batches without one count every row), so the loss sees
    the real rows of exactly the drawn samples; a mask of the wrong shape or dtype is refused."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 6, 3, generator=g) for _ in range(3)]
    ts = [x * 2 for x in xs]
    masks = [x[..., 0] > 0 for x in xs[:2]] + [None]  # the last batch pads nothing
    mb = MiniBatches(lambda i: ((xs[i],), {}), ts, batch_size=5, seed=1, masks=masks)
    assert mb.why_whole is None
    for _ in range(20):
        (x,), _, target, mask = mb.draw_masked()
        assert torch.equal(target, 2 * x)
        in_last = torch.tensor([any(torch.equal(row, b) for b in xs[2]) for row in x])  # [5]: from the unmasked batch
        want = in_last[:, None] | (x[..., 0] > 0)
        assert (mask is None and bool(want.all())) or torch.equal(mask, want)
    whole = MiniBatches(lambda i: ((xs[i],), {}), ts, batch_size=None, seed=1, masks=masks)
    for _ in range(3):
        (x,), _, _, mask = whole.draw_masked()
        i = next(k for k in range(3) if torch.equal(xs[k], x))
        assert mask is masks[i]
    with pytest.raises(ValueError, match="row mask"):
        MiniBatches(lambda i: ((xs[i],), {}), ts, batch_size=5, masks=[masks[0].long(), None, None])
    with pytest.raises(ValueError, match="row mask"):
        MiniBatches(lambda i: ((xs[i],), {}), ts, batch_size=5, masks=[masks[0][:, :3], None, None])
