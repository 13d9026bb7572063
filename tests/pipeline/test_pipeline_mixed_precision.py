"""Mixed precision through the pipeline: budget parsing, the budget met to within one step, decisions saved
in the recipe and reloaded bit-exactly, refusals."""

from __future__ import annotations

import pytest
import torch
from test_accumulator import TinyCNN, images

from numcast.algorithms.mixed_precision import FeatureGram
from numcast.algorithms.rtn import rtn
from numcast.formats.qtensor import storage_nbytes
from numcast.formats.registry import get_format
from numcast.pipeline.data_free import quantize_data_free
from numcast.pipeline.export import load_quantized, save_quantized
from numcast.pipeline.mixed_precision import LayerMeasure, measure_layers
from numcast.pipeline.plan import plan_layers
from numcast.pipeline.recipe import Recipe
from numcast.pipeline.runner import quantize_blockwise
from numcast.pipeline.settings import budget_bits

CANDIDATES = ["int2_g64", "int3_g64", "int4_g128", "int8_channel"]


def test_budget_parsing():
    assert budget_bits("4.5bits", 1000) == 4500
    assert budget_bits("3 bits", 10) == 30
    assert budget_bits("250kB", 1) == 2_000_000
    assert budget_bits("1MiB", 1) == 8 * 1024**2
    assert budget_bits("1000B", 1) == 8000
    for bad in ("four bits", "1000", "3.5"):  # a number without its unit: bits per parameter, or bytes?
        with pytest.raises(ValueError, match="bits per parameter"):
            budget_bits(bad, 10)


@pytest.mark.parametrize("strategy", ["lcl", "sensitivity"])
@pytest.mark.parametrize("budget", [2.5, 3.5, 6.0])
def test_budget_met_to_within_one_step_and_replayed_on_reload(strategy, budget, tmp_path):
    mp = {"strategy": strategy, "candidates": CANDIDATES, "budget": f"{budget}bits"}
    recipe = Recipe(weights="int4_channel", calibration=4, mixed_precision=mp)
    res = quantize_data_free(TinyCNN(), recipe, images())
    q = [r for r in res.layers if r.action == "quantized"]
    mods = dict(res.model.named_modules())
    params = sum(mods[r.name].weight.numel() for r in q)
    used = sum(8 * mods[r.name].qweight.nbytes for r in q)
    assert used <= budget * params
    steps = []
    for r in q:
        shape = tuple(mods[r.name].qweight.shape)
        costs = sorted(8 * storage_nbytes(shape, get_format(c)) for c in CANDIDATES)
        mine = 8 * storage_nbytes(shape, get_format(r.weight_format))
        steps += [c - mine for c in costs if c > mine][:1]
    assert not steps or budget * params - used < min(steps)
    assert {o.pattern: o.weights for o in res.recipe.overrides} == {r.name: r.weight_format for r in q}
    save_quantized(res.model, tmp_path, "tiny", res.recipe)
    again = load_quantized(TinyCNN(), tmp_path / "model.safetensors")
    x = images(1, seed=5)[0]
    with torch.no_grad():
        assert torch.equal(again(x), res.model(x))


def test_mixed_precision_through_the_runner_with_gptq():
    model = TinyCNN()
    recipe = Recipe(weights="int4_channel", method="gptq", calibration=4,
                    mixed_precision={"strategy": "lcl", "candidates": CANDIDATES, "budget": "3.5bits"})  # fmt: skip
    res = quantize_blockwise(model, [model.stem, model.body, model.head], images(), recipe, progress=False,
                             first_block_input="model")  # fmt: skip
    formats = {r.weight_format for r in res.layers if r.action == "quantized"}
    assert formats <= set(CANDIDATES) and len(formats) >= 2


def test_refusals():
    with pytest.raises(ValueError, match="two candidate formats and a budget"):
        Recipe(weights="int4_channel", mixed_precision={"strategy": "lcl", "candidates": ["int4_g128"]})
    with pytest.raises(ValueError, match="closest"):
        Recipe(weights="int4_channel", mixed_precision={"candidates": ["int5_g999x"]})
    recipe = Recipe(weights="int4_channel", mixed_precision={"strategy": "sensitivity", "candidates": CANDIDATES,
                                                             "budget": "3bits"})  # fmt: skip
    with pytest.raises(ValueError, match="needs calibration batches"):
        quantize_data_free(TinyCNN(), recipe)
    recipe = Recipe(weights="int4_channel", mixed_precision={"strategy": "lcl", "candidates": CANDIDATES,
                                                             "budget": "1bits"})  # fmt: skip
    with pytest.raises(ValueError, match="below the cheapest"):
        quantize_data_free(TinyCNN(), recipe)


def _measure(rows: torch.Tensor) -> LayerMeasure:
    f = FeatureGram()
    f.add(rows)
    return LayerMeasure(signal=float(rows.double().square().sum()), features=f)


def test_output_information_is_scale_free_grows_with_rank_and_not_with_width():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2000, 4, generator=g) @ torch.randn(4, 16, generator=g)
    assert _measure(base).information(0.1) == pytest.approx(_measure(1e3 * base).information(0.1), rel=1e-9)
    by_rank = [_measure(torch.randn(2000, r, generator=g) @ torch.randn(r, 16, generator=g)).information(0.1)
               for r in (1, 4, 16)]  # fmt: skip
    assert by_rank[0] < by_rank[1] < by_rank[2]
    wide = torch.cat([base, base], dim=1)  # the same information in twice the coordinates: half per coordinate
    assert _measure(wide).information(0.1) < 0.75 * _measure(base).information(0.1)
    assert _measure(torch.zeros(10, 3)).information(0.1) == 0.0


def test_measured_noise_is_the_layer_output_error_of_rtn():
    model = TinyCNN()
    batches = images()
    plans = [p for p in plan_layers(model, Recipe(weights="int4_channel")) if p.quantized]
    got = measure_layers(model, plans, ["int3_g64", "int8_channel"], batches)
    p = plans[0]
    inputs = []
    h = p.module.register_forward_hook(lambda m, a, o: inputs.append(a[0]))
    with torch.no_grad():
        for b in batches:
            model(b)
    h.remove()
    wq = rtn(p.module.weight, "int3_g64").dequantize().reshape(p.module.weight.shape)
    sig = noise = 0.0
    for x in inputs:
        with torch.no_grad():
            y = p.module(x).double()
            yq = torch.nn.functional.conv2d(x, wq, p.module.bias, p.module.stride, p.module.padding,
                                            p.module.dilation, p.module.groups).double()  # fmt: skip
        sig, noise = sig + float(y.square().sum()), noise + float((y - yq).square().sum())
    assert got[p.name].relative_noise("int3_g64") == pytest.approx(noise / sig, rel=1e-9)
    assert got[p.name].relative_noise("int8_channel") < got[p.name].relative_noise("int3_g64")
