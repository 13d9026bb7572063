"""The one table of methods: the recipe, the CLI and the runner all read it, so a method registered once is usable
everywhere, and the capabilities it declares are what the pipeline does."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from numcast.algorithms.rtn import rtn
from numcast.cli import build_parser
from numcast.pipeline.data_free import quantize_data_free
from numcast.pipeline.methods import METHODS, RTN, register_method
from numcast.pipeline.recipe import Recipe
from numcast.pipeline.runner import quantize_blockwise


def tiny_mlp() -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)).eval()


@pytest.fixture
def halved():
    """A method that quantizes half of every weight (its result differs from RTN's in a way a test can see)."""

    @register_method
    class Halved(RTN):
        name = "test-halved"

        def solve(self, plan, stats=None):
            return rtn(plan.module.weight / 2, plan.weight_format)

    yield Halved
    METHODS.pop(Halved.name)


def test_the_recipe_and_the_cli_read_the_table(halved):
    assert Recipe(weights="int8_channel", method=halved.name).method == halved.name
    choices = next(a.choices for a in build_parser()._subparsers._group_actions[0].choices["quantize"]._actions
                   if a.dest == "method")  # fmt: skip
    assert list(choices) == list(METHODS) and halved.name in choices


def test_a_registered_method_runs_without_and_with_the_runner(halved):
    recipe = Recipe(weights="int8_channel", method=halved.name)
    ref = tiny_mlp()
    want = [rtn(m.weight / 2, "int8_channel").dequantize() for m in (ref[0], ref[2])]
    seq = tiny_mlp()
    results = [
        quantize_data_free(tiny_mlp(), recipe),
        quantize_blockwise(seq, [seq], [torch.randn(4, 32)], recipe, progress=False, first_block_input="model"),
    ]
    for res in results:
        got = [res.model[0].weight, res.model[2].weight]
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        assert {r.method for r in res.quantized} == {halved.name}


def test_unknown_and_duplicate_names_are_refused():
    with pytest.raises(ValueError, match="did you mean gptq"):
        Recipe(weights="int8_channel", method="gptqq")
    with pytest.raises(ValueError, match="new, non-empty name"):

        @register_method
        class Again(RTN):
            name = "rtn"


def test_declared_capabilities_are_enforced():
    with pytest.raises(ValueError, match="needs an accumulator width"):
        Recipe(weights="int4_channel", activations="int4", method="ep-init")
    with pytest.raises(ValueError, match="calibration"):
        Recipe(weights="int4_channel", method="gptq", calibration=0)
    assert Recipe(weights="int4_channel", method="rtn", calibration=0).calibration == 0
    with pytest.raises(ValueError, match="layer-wise calibration pipeline"):
        quantize_data_free(tiny_mlp(), Recipe(weights="int4_channel", method="gptq"))
    for name, cls in METHODS.items():
        m = Recipe(weights="int4_channel", activations="int4", method=name, accumulator={"bits": 16}).make_method()
        assert m.name == name and isinstance(m, cls)
        assert not (m.solves_blocks and m.needs_inputs)  # a block-level solve reads the streams itself
        assert not m.needs_float_inputs or m.needs_inputs or m.solves_blocks
