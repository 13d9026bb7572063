"""The block-wise runner: RTN through it equals quantize_data_free, GPTQ through it beats RTN, every quantized
layer gets a method and an SQNR, grouped convolutions get per-group Hessians."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_bitwise
from torch import nn

from numcast.algorithms.error_diffusion import error_diffusion
from numcast.nn.observe import layer_inputs_2d
from numcast.pipeline.data_free import quantize_data_free
from numcast.pipeline.layer_stats import GramStatistics, HessianStatistics
from numcast.pipeline.recipe import Recipe
from numcast.pipeline.runner import quantize_blockwise


class Block(nn.Module):
    """A residual MLP block called as block(x, scale=...), like a transformer layer with kwargs."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x, scale=None):
        return (x + scale * self.down(torch.relu(self.up(x))),)


class TinyLM(nn.Module):
    def __init__(self, d: int = 64) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = nn.Embedding(100, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(3)])
        self.head = nn.Linear(d, 100)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            # correlated embedding directions, as in real models
            self.embed.weight.copy_(torch.randn(100, 8, generator=g) @ torch.randn(8, d, generator=g))

    def forward(self, ids):
        x = self.embed(ids)
        for b in self.blocks:
            x = b(x, scale=0.5)[0]
        return self.head(x)


def batches(n: int = 6, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 100, (4, 16), generator=g) for _ in range(n)]


def test_rtn_through_the_runner_equals_quantize_data_free():
    recipe = Recipe(weights="mxfp4", activations="mxfp8_e4m3")
    ref = quantize_data_free(TinyLM(), recipe).model
    model = TinyLM()
    res = quantize_blockwise(model, list(model.blocks), batches(), recipe, progress=False)
    ids = batches(1, seed=9)[0]
    with torch.no_grad():
        assert_bitwise(res.model(ids), ref(ids), "rtn")
    by = {r.name: r for r in res.layers}
    assert by["blocks.0.up"].method == "rtn" and by["blocks.2.down"].sqnr_db > 5
    assert by["head"].method == "rtn (outside blocks)" and by["head"].sqnr_db is None


@pytest.mark.parametrize("fmt", ["int4_g32", "mxfp4", "int3_channel"])
@pytest.mark.parametrize("solver", ["gptq", "error-diffusion", "attention-round"])
def test_solvers_through_the_runner_beat_rtn_on_the_model_output(fmt, solver):
    data = batches()
    ids = torch.cat(batches(4, seed=5))
    with torch.no_grad():
        ref = TinyLM()(ids)
    errs = {}
    for method in ("rtn", solver):
        model = TinyLM()
        recipe = Recipe(weights=fmt, method=method, exclude=["head"], attention_round={"iterations": 200})
        quantize_blockwise(model, list(model.blocks), data, recipe, progress=False)
        with torch.no_grad():
            errs[method] = float((model(ids) - ref).square().mean())
    assert errs[solver] < 0.9 * errs["rtn"], errs


def test_error_diffusion_is_deterministic_and_independent_of_batch_splitting():
    """The statistics do not depend on how the samples are batched (the RTN guard is off: the batches it
    compares on are every 8th batch, so which samples they are depends on the batching by design)."""
    runs = []
    for split in (2, 4, 24):  # the same 24 sequences in batches of 2, 4 or 24
        seqs = torch.cat(batches(6))
        model = TinyLM()
        data = [seqs[i : i + split] for i in range(0, 24, split)]
        recipe = Recipe(weights="mxfp4", method="error-diffusion", error_diffusion={"rtn_guard": False})
        quantize_blockwise(model, list(model.blocks), data, recipe, progress=False)
        runs.append([m.weight.clone() for m in model.modules() if hasattr(m, "qweight")])
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert_bitwise(a, b, "batch split")


def test_gram_accumulator_of_a_grouped_conv_pairs_the_two_streams():
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    g = torch.Generator().manual_seed(4)
    xf = torch.randn(3, 4, 6, 6, generator=g)
    xq = xf + 0.1 * torch.randn(3, 4, 6, 6, generator=g)
    acc = GramStatistics()
    acc.add(conv, xq[:1], xf[:1])
    acc.add(conv, xq[1:], xf[1:])
    gm, hm = acc.result()
    rq, rf = layer_inputs_2d(conv, xq).double(), layer_inputs_2d(conv, xf).double()
    n = rq.shape[1]
    assert torch.allclose(gm, rq.transpose(1, 2) @ rf / n) and torch.allclose(hm, rq.transpose(1, 2) @ rq / n)
    with pytest.raises(RuntimeError, match="float stream"):
        acc.add(conv, xq, None)


def test_runner_refuses_empty_calibration():
    model = TinyLM()
    with pytest.raises(ValueError, match="empty"):
        quantize_blockwise(model, list(model.blocks), [], Recipe(weights="mxfp4", method="gptq"))


def test_conv_hessian_equals_explicit_patches():
    """Unfolded conv inputs, grouped: the Hessian of each group from patches extracted by hand."""
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(3))
    acc = HessianStatistics()
    acc.add(conv, x)
    xp = F.pad(x, (1, 1, 1, 1))
    for gi in range(2):
        rows = []
        for n in range(2):
            for i in range(0, 5, 2):
                for j in range(0, 5, 2):
                    rows.append(xp[n, 2 * gi : 2 * gi + 2, i : i + 3, j : j + 3].reshape(-1))
        r = torch.stack(rows).double()
        assert torch.allclose(acc.result()[gi], 2 * r.T @ r / r.shape[0])
    # the weight view pairs with those columns: conv(x) == rows @ W_view^T per group
    cols = layer_inputs_2d(conv, x)
    w = conv.weight.detach().reshape(6, -1)
    y = torch.cat([cols[gi] @ w[3 * gi : 3 * gi + 3].T for gi in range(2)], dim=1)
    ref = (conv(x) - conv.bias[None, :, None, None]).permute(0, 2, 3, 1).reshape(-1, 6)
    assert torch.allclose(y, ref.detach(), atol=1e-5)


def test_first_block_fed_with_model_inputs_when_it_is_a_view():
    """A stem that is a view over the model's modules is never called by the model's forward: its inputs are the
    calibration tensors themselves (first_block_input="model"); capturing would find nothing."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1))

    class View(nn.Module):
        def __init__(self, a, b):
            super().__init__()
            self.a, self.b = a, b

        def forward(self, x):
            return self.b(self.a(x))

    blocks = [View(net[0], net[1]), net[2]]
    data = [torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with pytest.raises(ValueError, match=r"block 0 \(View\) is never called by the model.s forward"):
        quantize_blockwise(net, blocks, data, Recipe(weights="int8_channel"), progress=False)
    res = quantize_blockwise(net, blocks, data, Recipe(weights="int8_channel", method="gptq"), progress=False,
                             first_block_input="model")  # fmt: skip
    assert all(r.method == "gptq" for r in res.quantized) and len(res.quantized) == 2


class GatedBlock(nn.Module):
    """gate and up read the same tensor (a Llama MLP), down reads their product."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x, scale=None):
        return (x + scale * self.down(F.silu(self.gate(x)) * self.up(x)),)


def test_layers_reading_one_input_are_solved_from_one_pass_with_the_same_result():
    runs = {}
    for share in (False, True):
        model = TinyLM()
        model.blocks = nn.ModuleList([GatedBlock(64) for _ in range(2)])
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in model.blocks.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        passes = [0]
        model.blocks[0].register_forward_pre_hook(lambda *_, c=passes: c.__setitem__(0, c[0] + 1))
        quantize_blockwise(model, list(model.blocks), batches(), Recipe(weights="mxfp4", method="gptq"),
                           progress=False, share_inputs=share)  # fmt: skip
        weights = {n: m.weight.clone() for n, m in model.named_modules() if hasattr(m, "qweight")}
        runs[share] = (passes[0], weights)
    (n_sep, w_sep), (n_shared, w_shared) = runs[False], runs[True]
    assert n_shared == n_sep - len(batches())  # gate+up share a pass: one calibration pass fewer in block 0
    assert len(w_sep) == 7 and w_sep.keys() == w_shared.keys()  # 2 blocks × 3 + the head
    for k in w_sep:
        assert_bitwise(w_shared[k], w_sep[k])


def test_error_diffusion_refits_layers_kept_in_float():
    ids = torch.cat(batches(4, seed=5))
    with torch.no_grad():
        ref = TinyLM()(ids)
    errs, kept = {}, {}
    for refit in (False, True):
        model = TinyLM()
        before = model.blocks[1].up.weight.detach().clone()
        recipe = Recipe(weights="int3_channel", method="error-diffusion", exclude=["head", "blocks.1.*"],
                        error_diffusion={"calibrate_float_layers": refit})  # fmt: skip
        res = quantize_blockwise(model, list(model.blocks), batches(), recipe, progress=False)
        with torch.no_grad():
            errs[refit] = float((model(ids) - ref).square().mean())
        kept[refit] = torch.equal(model.blocks[1].up.weight, before)
        entry = {r.name: r for r in res.layers}["blocks.1.up"]
        assert entry.action == "skipped" and ("re-fit" in (entry.method or "")) == refit
    assert kept[False] and not kept[True]
    assert errs[True] < errs[False], errs


def test_error_diffusion_damping_reaches_every_solve_and_refit(monkeypatch):
    """The recipe's ``damp`` is the one each Error Diffusion solve and float re-fit is given, and it changes the
    model's weights."""
    import numcast.pipeline.methods as methods

    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["damp"])
        return error_diffusion(*args, **kwargs)

    monkeypatch.setattr(methods, "error_diffusion", spy)
    weights = {}
    for damp in (0.0, 0.3):
        model = TinyLM()
        recipe = Recipe(weights="int3_channel", method="error-diffusion", exclude=["head", "blocks.1.*"],
                        error_diffusion={"calibrate_float_layers": True, "rtn_guard": False, "damp": damp})  # fmt: skip
        quantize_blockwise(model, list(model.blocks), batches(), recipe, progress=False)
        weights[damp] = [m.weight.detach().clone() for m in model.modules() if isinstance(m, nn.Linear) or
                         hasattr(m, "qweight")]  # fmt: skip
    assert seen == [0.0] * 6 + [0.3] * 6  # 3 blocks × (up, down): 4 solves and 2 re-fits per run
    assert any(not torch.equal(a, b) for a, b in zip(weights[0.0], weights[0.3], strict=True))


@pytest.mark.parametrize("method", ["rtn", "gptq", "error-diffusion"])
def test_float_originals_are_released_block_by_block(method):
    """Memory stays near one model: a block's float layers are dropped once the block is done."""
    import gc
    import weakref

    model = TinyLM()
    refs = {n: weakref.ref(m) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    alive_after_block0 = []

    def check(_mod, _args):  # block 1's passes: the probe's comes first, then those while block 1 is solved
        gc.collect()
        alive_after_block0.append(refs["blocks.0.up"]() is not None)

    model.blocks[1].register_forward_pre_hook(check)
    res = quantize_blockwise(model, list(model.blocks), batches(), Recipe(weights="mxfp4", method=method),
                             progress=False)  # fmt: skip
    del res
    gc.collect()
    assert alive_after_block0[0] and not alive_after_block0[-1]  # released before block 1 was solved
    assert all(r() is None for r in refs.values()), [n for n, r in refs.items() if r() is not None]


def test_finished_blocks_hold_their_4_bit_codes_packed_during_an_in_memory_run(monkeypatch):
    """While later blocks are solved, a finished block's MXFP4 layers hold packed codes and no float weight; the
    model after the run computes what a run without packing computes (the codes unpack bit for bit)."""
    from numcast.nn.modules import QuantWeightModule

    model = TinyLM()
    seen = []

    def check(_mod, _args):
        seen.append([(m._buffers.get("weight") is None, m.__dict__.get("_packed_qweight") is not None)
                     for m in model.blocks[0].modules() if isinstance(m, QuantWeightModule)])  # fmt: skip

    model.blocks[1].register_forward_pre_hook(check)
    quantize_blockwise(model, list(model.blocks), batches(), Recipe(weights="mxfp4", method="gptq"), progress=False)
    assert seen[-1] and all(released and packed for released, packed in seen[-1])
    release = QuantWeightModule.release_float_weight
    monkeypatch.setattr(QuantWeightModule, "release_float_weight", lambda m, pack=False: release(m, pack=False))
    ref = TinyLM()
    quantize_blockwise(ref, list(ref.blocks), batches(), Recipe(weights="mxfp4", method="gptq"), progress=False)
    ids = torch.cat(batches(2, seed=9))
    with torch.no_grad():
        assert_bitwise(model(ids), ref(ids), "packed vs unpacked run")


def test_attention_round_block_and_layer_objectives_beat_rtn_and_are_deterministic():
    data = batches()
    ids = torch.cat(batches(4, seed=5))
    with torch.no_grad():
        ref = TinyLM()(ids)
    errs, outs = {}, {}
    for key, ar in [("rtn", None), ("block", {"objective": "block", "iterations": 150}),
                    ("block-again", {"objective": "block", "iterations": 150}),
                    ("layer", {"objective": "layer", "iterations": 150})]:  # fmt: skip
        model = TinyLM()
        method = "rtn" if ar is None else "attention-round"
        recipe = Recipe(weights="int3_channel", method=method, exclude=["head"], attention_round=ar or {})
        res = quantize_blockwise(model, list(model.blocks), data, recipe, progress=False)
        with torch.no_grad():
            outs[key] = model(ids)
        errs[key] = float((outs[key] - ref).square().mean())
        assert all(r.method == method for r in res.layers if r.name.startswith("blocks."))
    assert errs["block"] < 0.9 * errs["rtn"] and errs["layer"] < 0.9 * errs["rtn"], errs
    assert torch.equal(outs["block"], outs["block-again"])


def test_attention_round_on_a_block_that_is_a_bare_layer():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    x = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    recipe = Recipe(weights="int3_channel", method="attention-round", attention_round={"iterations": 30})
    blocks = [model[0], nn.Sequential(model[1], model[2])]  # the first block is the bare layer itself
    res = quantize_blockwise(model, blocks, x, recipe, progress=False, first_block_input="model")
    assert [r.method for r in res.layers] == ["attention-round", "attention-round"]


def _qweights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.clone() for n, m in model.named_modules() if hasattr(m, "qweight")}


def _error_diffusion_run(rtn_guard: bool):
    """The tiny LM quantized to int4_g32 by Error Diffusion (head in float) on 16 batches (two of them the guard's),
    with or without the RTN guard."""
    model = TinyLM()
    recipe = Recipe(weights="int4_g32", method="error-diffusion", exclude=["head"],
                    error_diffusion={"rtn_guard": rtn_guard})  # fmt: skip
    return model, quantize_blockwise(model, list(model.blocks), batches(16), recipe, progress=False)


def _sabotaged(self, plan, stats):
    """An Error Diffusion solve gone wrong: the weights' signs flipped, still on the grid."""
    from numcast.algorithms.rtn import rtn

    return rtn(-plan.module.weight.detach(), plan.weight_format)


def test_rtn_guard_gives_the_rtn_model_where_the_solutions_end_further_from_float(monkeypatch):
    """With sabotaged solves the model's output ends further from the float model's than RTN's: with the guard
    every layer ends as RTN, bit for bit, and says so; without it the sabotage stays."""
    from numcast.pipeline.methods import ErrorDiffusion

    rtn_model = TinyLM()
    quantize_blockwise(rtn_model, list(rtn_model.blocks), batches(16), Recipe(weights="int4_g32", exclude=["head"]),
                       progress=False)  # fmt: skip
    monkeypatch.setattr(ErrorDiffusion, "solve", _sabotaged)
    got = {}
    for guard in (True, False):
        model, res = _error_diffusion_run(guard)
        got[guard] = _qweights(model)
        methods = {r.method for r in res.layers if r.name.startswith("blocks.")}
        assert methods == ({"error-diffusion -> rtn (RTN model closer to float)"} if guard else {"error-diffusion"})
    want = _qweights(rtn_model)
    for name, w in got[True].items():
        assert_bitwise(w, want[name], name)
    assert not any(torch.equal(w, want[n]) for n, w in got[False].items())


def test_rtn_guard_keeps_the_solutions_where_they_end_closer():
    """Error Diffusion's own solutions bring the tiny LM's output closer to the float model's than RTN's: the
    guard keeps them, the same weights as without the guard (its batches are in the statistics too)."""
    runs = {}
    for guard in (True, False):
        model, res = _error_diffusion_run(guard)
        assert all("->" not in (r.method or "") for r in res.layers)
        runs[guard] = _qweights(model)
    for name, w in runs[True].items():
        assert_bitwise(w, runs[False][name], name)


def test_the_kept_float_pass_gives_the_same_model_as_float_passes_per_group(monkeypatch):
    """Error Diffusion with the float twin run once per block (its layer inputs kept) equals the run with a float
    pass per group (forced: no memory to keep them), bit for bit, and the kept pass does run."""
    from numcast.pipeline import runner

    kept = []  # per block: whether the float pass was kept
    original = runner.Streams.float_pass

    def float_pass(self, job):
        got = original(self, job)
        kept.append(got is not None)
        return got

    monkeypatch.setattr(runner.Streams, "float_pass", float_pass)
    runs = []
    for memory in (1 << 40, 0):
        monkeypatch.setattr(runner, "available_memory", lambda memory=memory: memory)
        model = TinyLM()
        recipe = Recipe(weights="mxfp4", method="error-diffusion")
        res = quantize_blockwise(model, list(model.blocks), batches(), recipe, progress=False)
        runs.append((_qweights(model), {r.name: r.sqnr_db for r in res.layers}))
    assert kept == [True] * 3 + [False] * 3
    for name, w in runs[0][0].items():
        assert_bitwise(w, runs[1][0][name], name)
    assert runs[0][1] == runs[1][1]


def test_layer_sqnr_is_measured_on_evenly_spaced_batches():
    """With 16 batches the SQNR of a layer is measured on every second one (8 of them): it equals the SQNR
    computed independently from the finished model's layer inputs on batches 0, 2, ..., 14 (float64 sums)."""
    from numcast.pipeline.runner import Streams

    data = batches(16)
    assert Streams.SQNR_BATCHES == 8
    float_up = TinyLM().blocks[1].up
    model = TinyLM()
    res = quantize_blockwise(model, list(model.blocks), data, Recipe(weights="int4_g32", method="gptq"),
                             progress=False)  # fmt: skip
    seen = []
    hook = model.blocks[1].up.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        for b in data:
            model(b)
    hook.remove()

    @torch.no_grad()
    def sqnr(which):
        sig = noise = 0.0
        for i in which:
            ref = float_up(seen[i])
            sig += float(ref.square().sum(dtype=torch.float64))
            noise += float((model.blocks[1].up(seen[i]) - ref).square().sum(dtype=torch.float64))
        return 10 * math.log10(sig / noise)

    got = {r.name: r.sqnr_db for r in res.layers}["blocks.1.up"]
    assert got == pytest.approx(sqnr(range(0, 16, 2)), rel=1e-9)
    assert got != pytest.approx(sqnr(range(16)), rel=1e-6)  # the sample, not every batch


def test_rtn_guard_reverts_static_activation_layers_with_their_scales_calibrated_again(monkeypatch):
    """Sabotaged solves with static int8 inputs: the reverted layers carry RTN's weights (bit for bit) and input
    scales calibrated on the RTN model (every one set, the model's outputs finite)."""
    from numcast.pipeline.methods import ErrorDiffusion

    recipe = dict(weights="int4_g32", activations="int8_tensor", activation_mode="static", exclude=["head"])
    rtn_model = TinyLM()
    quantize_blockwise(rtn_model, list(rtn_model.blocks), batches(), Recipe(**recipe), progress=False)
    monkeypatch.setattr(ErrorDiffusion, "solve", _sabotaged)
    model = TinyLM()
    res = quantize_blockwise(model, list(model.blocks), batches(), Recipe(method="error-diffusion", **recipe),
                             progress=False)  # fmt: skip
    assert {r.method for r in res.layers if r.name.startswith("blocks.")} == {
        "error-diffusion -> rtn (RTN model closer to float)"}  # fmt: skip
    want = _qweights(rtn_model)
    for name, w in _qweights(model).items():
        assert_bitwise(w, want[name], name)
    quantizers = [m.input_quant for m in model.modules() if hasattr(m, "qweight")]
    assert quantizers and all(q.calibrated and not q.bypass for q in quantizers)
    with torch.no_grad():
        assert torch.isfinite(model(batches(1, seed=5)[0])).all()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/pagemap: Linux")
def test_an_in_memory_run_holds_finished_blocks_as_codes_and_gives_back_checkpoint_pages(tmp_path):
    """A checkpoint transformers memory-maps: after GPTQ in memory, the quantized layers' pages of the file are
    no longer resident (each was read by the probe forward, the finiteness check and the solve) and no finished
    layer keeps its float copy; the model still computes what its codes say."""
    import transformers as tf
    from helpers import resident_bytes, smaps_entry, sync_file

    from numcast.nn.modules import QuantWeightModule

    config = tf.LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                            num_attention_heads=4, tie_word_embeddings=False)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tf.LlamaForCausalLM(config).save_pretrained(tmp_path)
    sync_file(tmp_path / "model.safetensors")
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    originals = {n: m.weight for n, m in model.model.layers.named_modules() if isinstance(m, nn.Linear)}
    assert smaps_entry(originals["1.mlp.up_proj"].data_ptr())["path"].endswith("model.safetensors")  # mapped
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    batches = [{"input_ids": ids[i : i + 2]} for i in (0, 2)]
    with torch.no_grad():
        model(**batches[0])
    assert all(resident_bytes(w) >= w.nbytes for w in originals.values())  # a forward leaves them resident
    result = quantize_blockwise(model, list(model.model.layers), batches, Recipe(weights="mxfp4", method="gptq"),
                                progress=False)  # fmt: skip
    left = {n: resident_bytes(w) for n, w in originals.items()}
    # what may stay: the pages each weight shares with a neighbour, and pages a core has not yet put on the
    # kernel's LRU lists (per-CPU batches of a few dozen pages cannot be reclaimed until drained)
    assert sum(left.values()) <= 0.1 * sum(w.nbytes for w in originals.values()), left
    layers = [m for m in model.model.layers.modules() if isinstance(m, QuantWeightModule)]
    assert len(layers) == 14 and all(m._buffers["weight"] is None for m in layers)  # codes only
    for m in layers:
        assert torch.equal(m.weight, m.qweight.dequantize().reshape(m.weight_shape))  # decoded again on use
    assert [r.method for r in result.layers if r.action == "quantized"] == ["gptq"] * 14


@pytest.mark.parametrize("kind", [HessianStatistics, GramStatistics])
def test_the_last_reader_takes_the_sums_and_earlier_readers_get_copies(kind):
    """q/k/v share one statistics object: the first two reads get fresh tensors, the third the sums' own memory
    (float64 [in, in] each), the same values every time; a fourth read is refused. Unknown readers: never spent."""
    lin = nn.Linear(16, 4)
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(11))

    def fed(readers):
        s = kind()
        s.add(lin, x, x + 0.1) if kind is GramStatistics else s.add(lin, x)
        s.readers = readers
        return s

    def values(r):
        return [t.clone() for t in (r if isinstance(r, tuple) else (r,))]

    want = values(fed(None).result())
    s = fed(3)
    sums = [s.h] if kind is HessianStatistics else [s.g, s.h]
    for read in range(3):
        got = s.result()
        for t, v, mine in zip(got if isinstance(got, tuple) else (got,), want, sums, strict=True):
            assert_bitwise(t, v, f"read {read}")
            assert (t.data_ptr() == mine.data_ptr()) == (read == 2)
    with pytest.raises(RuntimeError, match="last reader"):
        s.result()
    forever = fed(None)
    for _ in range(3):
        for t, v in zip(values(forever.result()), want, strict=True):
            assert_bitwise(t, v, "unknown readers")


def test_hessian_in_column_major_layout_has_the_same_values():
    lin = nn.Linear(16, 4)
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(12))
    for readers in (None, 1):
        s = HessianStatistics()
        s.add(lin, x)
        s.readers = readers
        rows = s.result() if readers is None else None
        h = s.result(column_major=True)
        assert h.mT.is_contiguous()
        if rows is not None:
            assert_bitwise(h, rows, "layout")
