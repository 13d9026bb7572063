"""Layers on disk (``--offload disk``): the same numbers as in memory, and nothing of a block stays in memory
once the runner is done with it."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_llama_folder
from safetensors.torch import load_file

from numcast.cli import main
from numcast.models.hf_local import load_local_model
from numcast.nn.modules import QuantWeightModule
from numcast.pipeline.block_inputs import Placement
from numcast.pipeline.offload import disk_offload_of
from numcast.pipeline.recipe import Recipe
from numcast.pipeline.runner import quantize_blockwise


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    folder, _, tok = tiny_llama_folder(tmp_path_factory.mktemp("offload") / "llm")
    ids = torch.randint(0, len(tok), (2, 48), generator=torch.Generator().manual_seed(0))
    return folder, ids


def test_float_forward_streams_the_layers_from_disk(llm):
    folder, ids = llm
    ref, *_ = load_local_model(folder)
    model, *_ = load_local_model(folder, offload="disk")
    layers = list(model.model.layers)
    assert all(p.is_meta for b in layers for p in b.parameters())  # nothing of the layers in memory
    assert not model.model.embed_tokens.weight.is_meta and not model.model.norm.weight.is_meta
    with torch.no_grad():
        assert torch.equal(ref(input_ids=ids).logits, model(input_ids=ids).logits)
    assert all(p.is_meta for b in layers for p in b.parameters())  # read for the forward, released after


@pytest.mark.parametrize("method", ["gptq", "error-diffusion"])
def test_quantizing_from_disk_gives_the_same_model(llm, method):
    folder, ids = llm
    cal = [{"input_ids": ids[:1]}, {"input_ids": ids[1:]}]
    recipe = Recipe(weights="mxfp4", method=method, calibration=2)
    ref, *_ = load_local_model(folder)
    model, *_ = load_local_model(folder, offload="disk")
    a = quantize_blockwise(ref, list(ref.model.layers), cal, recipe, progress=False)
    disk = disk_offload_of(model)
    b = quantize_blockwise(model, list(model.model.layers), cal, recipe, progress=False, placement=Placement(disk=disk))
    assert [r.sqnr_db for r in a.quantized] == [r.sqnr_db for r in b.quantized]
    quantized = [m for m in model.modules() if isinstance(m, QuantWeightModule)]
    assert quantized and all(m.qweight is None and m.weight.is_meta for m in quantized)  # spilled to disk
    assert len(list(disk.spill.iterdir())) == len(quantized)
    with torch.no_grad():
        assert torch.equal(ref(input_ids=ids).logits, model(input_ids=ids).logits)


def test_rtn_guard_reverts_spilled_layers_from_disk_as_in_memory(llm, monkeypatch):
    """Sabotaged Error Diffusion solves are reverted to RTN by the guard from disk too: the spilled layers'
    files are rewritten (the same logits as the in-memory run and as plain RTN), and the guard's own files go."""
    from numcast.algorithms.rtn import rtn
    from numcast.pipeline.methods import ErrorDiffusion

    monkeypatch.setattr(ErrorDiffusion, "solve", lambda self, plan, stats: rtn(-plan.module.weight.detach(),
                                                                               plan.weight_format))  # fmt: skip
    folder, ids = llm
    cal = [{"input_ids": ids[:1]}, {"input_ids": ids[1:]}]
    runs = {}
    for where in ("memory", "disk", "rtn"):
        model, *_ = load_local_model(folder, offload="disk" if where == "disk" else "none")
        placement = Placement(disk=disk_offload_of(model)) if where == "disk" else None
        recipe = Recipe(weights="mxfp4", method="rtn" if where == "rtn" else "error-diffusion", calibration=2)
        res = quantize_blockwise(model, list(model.model.layers), cal, recipe, progress=False, placement=placement)
        if where != "rtn":
            assert {r.method for r in res.quantized if ".layers." in r.name} == {
                "error-diffusion -> rtn (RTN model closer to float)"}  # fmt: skip
        if where == "disk":
            spilled = sorted(p.name for p in disk_offload_of(model).spill.iterdir())
            assert spilled and not any(name.startswith("rtn-guard") for name in spilled)
        with torch.no_grad():
            runs[where] = model(input_ids=ids).logits
    assert torch.equal(runs["memory"], runs["disk"]) and torch.equal(runs["memory"], runs["rtn"])


def test_cli_offload_writes_the_same_packed_model(llm, tmp_path, capsys):
    folder, _ = llm
    base = ["quantize", str(folder), "--weights", "mxfp4", "--method", "gptq", "--calibration", "2", "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "mem"), "--json"]) == 0
    assert main([*base, "--offload", "disk", "--out", str(tmp_path / "disk"), "--json"]) == 0
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("mem", "disk"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("mem", "disk"))
    assert rb["offload"] == "disk" and ra["metrics"] == rb["metrics"] and ra["size_bytes"] == rb["size_bytes"]
    capsys.readouterr()
    assert main(["quantize", "fmnist-cnn", "--weights", "int8_channel", "--offload", "disk", "--out",
                 str(tmp_path / "fm")]) == 2  # fmt: skip
    assert "fmnist-cnn is not one" in capsys.readouterr().out
    assert main([*base, "--offload", "disk", "--method", "error-diffusion", "--ed-calibrate-float-layers",
                 "--out", str(tmp_path / "refit")]) == 2  # fmt: skip
    assert "does not run with the layers offloaded" in capsys.readouterr().out
