"""Accumulator-aware recipes through the pipeline: every layer meets its budget whatever the method, input
signs are resolved and saved, static activations are calibrated block by block, bad recipes are refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from numcast.accumulator.bounds import min_accumulator_bits
from numcast.accumulator.codes import integer_codes
from numcast.accumulator.simulate import accumulate, adversarial_inputs
from numcast.nn.act_quant import ActQuantizer
from numcast.pipeline.data_free import quantize_data_free
from numcast.pipeline.export import load_quantized, save_quantized
from numcast.pipeline.recipe import Recipe
from numcast.pipeline.runner import quantize_blockwise


class TinyCNN(nn.Module):
    """stem (signed image input) → ReLU → body conv (post-ReLU input) → ReLU → pool → fc (post-ReLU input)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


def images(n: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 8, 8, generator=g) for _ in range(n)]


def _layers(model):
    return {n: m for n, m in model.named_modules() if hasattr(m, "qweight")}


def _overflows_adversarially(qt, fmt, P) -> bool:
    n, signed = fmt.element.bits, fmt.element.signed
    q = integer_codes(qt).long()
    return any(int(accumulate(adversarial_inputs(q, n, signed, s), q, P, paired=True).overflows.sum()) for s in (1, -1))


def _check_guarantee(model, P, rule):
    for name, m in _layers(model).items():
        fmt = m.input_quant.fmt
        q = integer_codes(m.qweight).long()
        n, signed = fmt.element.bits, fmt.element.signed
        assert int(min_accumulator_bits(q, n, signed, rule).max()) <= P, name
        assert not _overflows_adversarially(m.qweight, fmt, P), name


@pytest.mark.parametrize("rule", ["a2q", "a2q+"])
@pytest.mark.parametrize("method", ["ep-init", "rtn", "gptq", "error-diffusion"])
def test_every_method_meets_the_budget_through_the_runner(method, rule):
    P = 13
    model = TinyCNN()
    recipe = Recipe(weights="int4_channel", activations="int4", method=method, calibration=4,
                    accumulator={"bits": P, "rule": rule})  # fmt: skip
    res = quantize_blockwise(model, [model.stem, model.body, model.head], images(), recipe, progress=False,
                             first_block_input="model")  # fmt: skip
    _check_guarantee(res.model, P, rule)
    by = {r.name: r for r in res.layers}
    assert by["stem.0"].activation_format == "int4_tensor"  # signed image input
    assert by["body.0"].activation_format == "uint4_tensor" and by["head.2"].activation_format == "uint4_tensor"
    assert all(by[n].accumulator_bits <= P for n in ("stem.0", "body.0", "head.2"))
    assert {o.pattern: o.activations for o in res.recipe.overrides} == {
        "body.0": "uint4_tensor",
        "head.2": "uint4_tensor",
    }
    assert all(q.calibrated for q in res.model.modules() if isinstance(q, ActQuantizer))


def test_without_the_constraint_the_same_model_overflows():
    P = 13
    recipe = Recipe(weights="int4_channel", activations="uint4_tensor", activation_mode="static", calibration=4)
    model = quantize_data_free(TinyCNN(), recipe, images()).model
    assert _overflows_adversarially(model.body[0].qweight, model.body[0].input_quant.fmt, P)


def test_rows_within_budget_keep_the_solvers_codes():
    """A wide accumulator leaves GPTQ's solution untouched; a narrow one changes only rows over the budget."""
    base = dict(weights="int4_channel", activations="int4", method="gptq", calibration=4)
    out = {}
    for P in (None, 24, 12):
        model = TinyCNN()
        r = Recipe(**base, accumulator={"bits": P, "rule": "a2q", "input_sign": "format"})
        if P is None:
            r = Recipe(**{**base, "activations": "int4_tensor"}, activation_mode="static")
        res = quantize_blockwise(model, [model.stem, model.body, model.head], images(), r, progress=False,
                                 first_block_input="model")  # fmt: skip
        out[P] = integer_codes(res.model.body[0].qweight)
    assert torch.equal(out[24], out[None])
    changed = (out[12] != out[None]).any(1)
    over = out[None].abs().sum(1) > (2**11 - 1) * 2 ** (1 - 4)
    assert bool(over.any()) and torch.equal(changed, over)


def test_ep_init_through_quantize_data_free_matches_the_runner_and_reloads_bit_exactly(tmp_path):
    recipe = Recipe(weights="int4_channel", activations="int8", method="ep-init", calibration=4,
                    accumulator={"bits": 14})  # fmt: skip
    a = quantize_data_free(TinyCNN(), recipe, images())
    model = TinyCNN()
    b = quantize_blockwise(model, [model.stem, model.body, model.head], images(), recipe, progress=False,
                           first_block_input="model")  # fmt: skip
    for n, m in _layers(a.model).items():
        assert torch.equal(m.qweight.codes, _layers(b.model)[n].qweight.codes)
    save_quantized(a.model, tmp_path, "tiny", a.recipe)
    again = load_quantized(TinyCNN(), tmp_path / "model.safetensors")
    x = images(1, seed=7)[0]
    with torch.no_grad():
        assert torch.equal(again(x), a.model(x))
    assert again.body[0].input_quant.fmt.name == "uint8_tensor"


def test_static_activations_through_the_runner_are_calibrated_on_the_quantized_stream():
    recipe = Recipe(weights="int8_channel", activations="int8_tensor", activation_mode="static", calibration=4)
    model = TinyCNN()
    res = quantize_blockwise(model, [model.stem, model.body, model.head], images(), recipe, progress=False,
                             first_block_input="model")  # fmt: skip
    quants = [q for q in res.model.modules() if isinstance(q, ActQuantizer)]
    assert len(quants) == 3 and all(q.calibrated and not q.bypass for q in quants)
    x = images(1, seed=3)[0]
    with torch.no_grad():
        err = (res.model(x) - TinyCNN()(x)).square().mean() / TinyCNN()(x).square().mean()
    assert float(err) < 1e-2


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(method="ep-init"), "accumulator width"),
        (dict(accumulator={"bits": 16}), "integer layer inputs"),
        (dict(activations="fp8_e4m3_tensor", accumulator={"bits": 16}), "integer layer inputs"),
        (dict(activations="mxint8", accumulator={"bits": 16}), "integer layer inputs"),
        (dict(activations="int8_g32", accumulator={"bits": 16}), "one symmetric input scale"),
        (dict(activations="int8", accumulator={"bits": 1}), "greater than or equal to 2"),
    ],
)
def test_bad_recipes_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        Recipe(weights="int4_channel", calibration=4, **kw)


def test_weight_formats_without_per_channel_integers_are_refused_by_name():
    recipe = Recipe(weights="mxfp4", activations="int8", method="ep-init", accumulator={"bits": 16}, calibration=4)
    with pytest.raises(ValueError, match="stem.0: accumulator-aware quantization needs signed integer weights"):
        quantize_data_free(TinyCNN(), recipe, images())
