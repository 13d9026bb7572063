"""Padding tokens stay out of the calibration statistics (numcast.pipeline.padding, through the runner)."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import assert_bitwise

from numcast.pipeline.padding import real_tokens, token_mask
from numcast.pipeline.recipe import Recipe
from numcast.pipeline.runner import quantize_blockwise

transformers = pytest.importorskip("transformers")

VOCAB = 97
LENGTHS = [[11, 5, 8], [9, 9, 9], [3, 11, 7]]  # tokens per sample, per batch (the second pads nothing; the last
# is the RTN guard's)


def test_token_mask_reads_the_attention_mask():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.equal(token_mask({"input_ids": mask, "attention_mask": mask}), mask.bool())
    assert token_mask({"attention_mask": torch.ones(2, 3, dtype=torch.long)}) is None  # nothing padded
    assert token_mask({"input_ids": mask}) is None
    assert token_mask(mask) is None  # a bare tensor or tuple carries no mask
    with pytest.raises(ValueError, match="no real token"):
        token_mask({"attention_mask": torch.tensor([[1, 0], [0, 0]])})


def test_real_tokens_keeps_the_masked_rows_of_token_shaped_tensors_only():
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    mask = torch.tensor([[True, False, True], [False, True, True]])
    assert torch.equal(real_tokens(x, mask), torch.stack([x[0, 0], x[0, 2], x[1, 1], x[1, 2]]))
    assert real_tokens(x, None) is x
    assert real_tokens(x[:, :2], mask) is not None and real_tokens(x[:, :2], mask).shape == (2, 2, 4)  # other shape
    assert real_tokens(None, mask) is None


def _bert() -> torch.nn.Module:
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)  # fmt: skip
    with torch.random.fork_rng(devices=[]):  # seeded weights, the global RNG untouched
        torch.manual_seed(0)
        return transformers.BertModel(config).eval()


def _batches(pad_id_seed: int, width: int | None = None) -> list[dict[str, torch.Tensor]]:
    """The same real tokens in every call; the padding positions get token ids drawn with ``pad_id_seed``. Each
    batch is padded to its longest sample, or to ``width`` tokens."""
    real, pad = torch.Generator().manual_seed(1), torch.Generator().manual_seed(pad_id_seed)
    out = []
    for lengths in LENGTHS:
        ids = torch.randint(1, VOCAB, (len(lengths), max(lengths)), generator=real)
        ids = torch.nn.functional.pad(ids, (0, (width or max(lengths)) - ids.shape[1]))
        mask = (torch.arange(ids.shape[1])[None] < torch.tensor(lengths)[:, None]).long()
        ids = torch.where(mask.bool(), ids, torch.randint(1, VOCAB, ids.shape, generator=pad))
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _quantize(method: str, pad_id_seed: int):
    model = _bert()
    recipe = Recipe(weights="mxfp4", method=method, include=["encoder.*"])
    res = quantize_blockwise(model, list(model.encoder.layer), _batches(pad_id_seed), recipe, progress=False)
    weights = {n: m.weight.clone() for n, m in model.named_modules() if hasattr(m, "qweight")}
    return weights, {r.name: r.sqnr_db for r in res.layers}


@pytest.mark.parametrize("method", ["gptq", "error-diffusion"])
def test_what_the_padding_holds_changes_nothing(method, monkeypatch):
    """Padding positions run through the encoder (their hidden states depend on their token ids) but the mask hides
    them from the real tokens: the solved weights and the layers' SQNR do not depend on them, bit for bit, and
    every solve's statistics count exactly the real tokens."""
    from numcast.pipeline import methods

    cls = methods.ErrorDiffusion if method == "error-diffusion" else methods.GPTQ
    original, seen = cls.solve, []

    def solve(self, plan, stats):
        seen.append(stats.n)
        return original(self, plan, stats)

    monkeypatch.setattr(cls, "solve", solve)
    weights_a, sqnr_a = _quantize(method, 2)
    weights_b, sqnr_b = _quantize(method, 3)
    assert len(weights_a) == 12 and len(seen) == 24
    assert set(seen) == {sum(sum(lengths) for lengths in LENGTHS)}
    for name, w in weights_a.items():
        assert_bitwise(w, weights_b[name], name)
    assert sqnr_a == sqnr_b


def test_the_mixed_precision_measurement_ignores_the_padding():
    """The mixed-precision pass's per-layer sums (signal, each candidate's noise, the output Gram) do not depend on
    what the padding holds, and count the real tokens only."""
    from numcast.pipeline.mixed_precision import measure_layers
    from numcast.pipeline.plan import plan_layers

    got = []
    for pad_id_seed in (2, 3):
        model = _bert()
        plans = [p for p in plan_layers(model, Recipe(weights="mxfp4", include=["encoder.*"])) if p.quantized]
        got.append(measure_layers(model, plans, ["mxfp4", "int4_g32"], _batches(pad_id_seed), features=True))
    assert len(got[0]) == 12
    for name, a in got[0].items():
        b = got[1][name]
        assert (a.signal, a.noise) == (b.signal, b.noise), name
        assert a.features.n == sum(sum(lengths) for lengths in LENGTHS), name
        assert_bitwise(a.features.gram, b.features.gram, name)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_static_activation_ranges_ignore_the_padding(method):
    """Static int8 input scales calibrated on padded batches (data-free RTN: one model pass; GPTQ: the runner's
    pass per block, and its last pass for layers outside the blocks) do not depend on what the padding holds."""
    from numcast.nn.act_quant import ActQuantizer
    from numcast.pipeline.data_free import quantize_data_free

    amax = []
    for pad_id_seed in (2, 3):
        model = _bert()
        recipe = Recipe(weights="mxfp4", method=method, include=["encoder.*"], activations="int8_tensor",
                        activation_mode="static")  # fmt: skip
        if method == "rtn":
            quantize_data_free(model, recipe, _batches(pad_id_seed), inplace=True)
        else:
            quantize_blockwise(model, list(model.encoder.layer), _batches(pad_id_seed), recipe, progress=False)
        amax.append({n: float(m.amax) for n, m in model.named_modules() if isinstance(m, ActQuantizer)})
    assert len(amax[0]) == 12 and all(a > 0 for a in amax[0].values())
    assert amax[0] == amax[1]


@pytest.mark.parametrize("batch_size", [None, 4])
def test_attention_round_block_loss_ignores_the_padding(batch_size):
    """Attention Round's block reconstruction counts the real tokens only: whole calibration batches per step
    (``batch_size`` None), or mini-batches of 4 samples drawn across batches padded to one width (their masks
    drawn with them): the rounded weights do not depend on what the padding holds."""
    got = []
    for pad_id_seed in (2, 3):
        model = _bert()
        recipe = Recipe(weights="int4_g32", method="attention-round", include=["encoder.*"],
                        attention_round={"iterations": 15, "batch_size": batch_size})  # fmt: skip
        with warnings.catch_warnings():  # mini-batches: the calls must split by sample (no whole-batch warning)
            if batch_size is not None:
                warnings.filterwarnings("error", message="Attention Round")
            batches = _batches(pad_id_seed, width=12)
            quantize_blockwise(model, list(model.encoder.layer), batches, recipe, progress=False)
        got.append({n: m.weight.clone() for n, m in model.named_modules() if hasattr(m, "qweight")})
    assert len(got[0]) == 12
    for name, w in got[0].items():
        assert_bitwise(w, got[1][name], name)
