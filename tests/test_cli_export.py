"""`numcast export` and `numcast.export` end to end: a local Hugging Face model quantized by `numcast quantize`,
exported to GGUF and compressed-tensors from its output directory (reloaded bit-exactly first), read back by the
targets' readers; refusals name the problem."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import assert_bitwise, tiny_llama_folder

import numcast
from numcast.cli import main

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """`numcast quantize <tiny Llama folder> --weights mxfp4`: the output directory and the float model."""
    base = tmp_path_factory.mktemp("export")
    folder, model, tok = tiny_llama_folder(base / "llm")
    assert main(["quantize", str(folder), "--weights", "mxfp4", "--calibration", "1", "--out", str(base / "run"),
                 "--no-progress", "--json"]) == 0  # fmt: skip
    return base / "run", model, tok


def test_export_gguf_from_a_run_directory(run_dir, tmp_path, capsys):
    run, model, _ = run_dir
    out = tmp_path / "m.gguf"
    assert main(["export", str(run), "--to", "gguf", "--out", str(out), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["path"] == str(out) and set(rec["layers"].values()) == {"MXFP4"} and rec["float_layers"] == {}
    reader = gguf.GGUFReader(str(out))
    t = {x.name: x for x in reader.tensors}["blk.0.attn_v.weight"]  # v_proj rows are not permuted
    from numcast.pipeline.export import load_quantized

    load_quantized(model, run / "model.safetensors")
    got = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
    assert_bitwise(got + 0.0, model.model.layers[0].self_attn.v_proj.qweight.dequantize() + 0.0, "v_proj")
    assert main(["export", str(run), "--to", "gguf", "--out", str(out)]) == 2  # exists: needs --overwrite
    assert "overwrite" in capsys.readouterr().out


def test_export_compressed_tensors_from_a_run_directory(run_dir, tmp_path):
    run, _, _ = run_dir
    out = tmp_path / "ct"
    assert main(["export", str(run), "--to", "compressed-tensors", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["format"] == "mxfp4-pack-quantized"
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


def test_refusals_name_the_problem(run_dir, tmp_path, capsys):
    run, _, _ = run_dir
    assert main(["export", str(tmp_path), "--to", "gguf", "--out", str(tmp_path / "x.gguf")]) == 2
    assert "no packed model" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["export", str(run), "--to", "ggml", "--out", str(tmp_path / "x.gguf")])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"unknown export target 'ggml' \(did you mean gguf\?\)"):
        numcast.export(run, "ggml", tmp_path / "x.gguf")
    assert main(["export", str(run), "--to", "qonnx", "--out", str(tmp_path / "x.onnx")]) == 2
    assert "qonnx" in capsys.readouterr().out.lower()
    assert not (tmp_path / "x.onnx").exists()
    assert main(["export", str(run), "--to", "compressed-tensors", "--out", str(tmp_path / "ct"),
                 "--gguf-metadata", str(tmp_path / "a.gguf")]) == 2  # fmt: skip
    assert "does nothing for --to compressed-tensors" in capsys.readouterr().out


def test_python_export_of_a_quantization_result(tmp_path):
    _, model, tok = tiny_llama_folder(tmp_path / "llm")
    res = numcast.quantize_model(model, "gguf_q4_0")
    out = numcast.export(res, "gguf", tmp_path / "m.gguf", tokenizer=tok)
    assert set(out.layers.values()) == {"Q4_0"}
    fields = gguf.GGUFReader(str(out.path)).fields
    assert json.loads(fields["numcast.recipe"].contents())["weights"] == "gguf_q4_0"
    assert fields["general.quantized_by"].contents() == "numcast"
