"""Local Hugging Face folders and .gguf files as models: kind detection, block discovery, the generic GGUF
conversion (equal to the SmolLM2 adapter's), and quantize -> evaluate through the CLI on tiny folders."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from numcast.cli import main
from numcast.models.hf_local import gguf_float_folder, is_model_path, load_local_model, model_kind, transformer_blocks
from numcast.workloads import load_workload


def _tiny_folder(tmp_path, kind: str):
    """A randomly initialised 2-layer model saved with a shipped tokenizer (MiniLM's or SmolLM2's)."""
    from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    if kind == "encoder":
        from numcast.models.minilm import model_dir

        tok = AutoTokenizer.from_pretrained(model_dir())
        cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=512)  # fmt: skip
        model = BertModel(cfg)
    else:
        from numcast.models.smollm2 import float_folder

        tok = AutoTokenizer.from_pretrained(float_folder())
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=1, intermediate_size=64, tie_word_embeddings=True)  # fmt: skip
        torch.manual_seed(0)  # HF initialises from the global RNG; only this test's own folder depends on it
        model = LlamaForCausalLM(cfg)
    folder = tmp_path / f"tiny-{kind}"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_is_model_path(tmp_path):
    assert not is_model_path(str(tmp_path)) and not is_model_path("mobilenet-v2")
    (tmp_path / "x.bin").write_bytes(b"0")
    assert not is_model_path(str(tmp_path / "x.bin"))
    (tmp_path / "config.json").write_text("{}")
    assert is_model_path(str(tmp_path))


@pytest.mark.parametrize("kind", ["encoder", "causal-lm"])
def test_tiny_folder_quantizes_and_reloads_through_the_cli(tmp_path, capsys, kind):
    folder = _tiny_folder(tmp_path, kind)
    model, _tok, got, _ = load_local_model(folder)
    assert got == kind == model_kind(folder)
    blocks = transformer_blocks(model)
    layers = model.encoder.layer if kind == "encoder" else model.model.layers
    assert blocks == list(layers)
    out = tmp_path / "q"
    assert main(["quantize", str(folder), "--weights", "int4_g32", "--method", "gptq", "--calibration", "4",
                 "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    rec = json.loads((out / "report.json").read_text())
    assert rec["model"] == str(folder.resolve())
    assert rec["primary_metric"] == ("embedding_cosine" if kind == "encoder" else "perplexity")
    quantized = [r for r in rec["layers"] if r["action"] == "quantized"]
    inside = [r for r in quantized if ".layer." in r["name"] or ".layers." in r["name"]]
    assert len(inside) == 2 * (6 if kind == "encoder" else 7) and all(r["method"] == "gptq" for r in inside)
    capsys.readouterr()
    assert main(["evaluate", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["measured"] == rec["metrics"]["quantized"]


def test_not_a_model_folder_is_refused(tmp_path):
    with pytest.raises(ValueError, match="known models"):
        load_workload(str(tmp_path))  # exists, but no config.json
    with pytest.raises(FileNotFoundError, match="no such GGUF"):
        gguf_float_folder(tmp_path / "missing.gguf")


def test_gguf_path_converts_like_the_smollm2_adapter(tmp_path, monkeypatch):
    from numcast.models.smollm2 import gguf_path, load_smollm2

    ref, _ = load_smollm2()
    src = tmp_path / "copy.gguf"
    shutil.copyfile(gguf_path(), src)
    monkeypatch.setenv("NUMCAST_CACHE", str(tmp_path / "cache"))
    w = load_workload(str(src))
    assert w.primary == "perplexity" and len(w.blocks(w.model)) == 30
    folder = gguf_float_folder(src)
    assert folder.parent == tmp_path / "cache" and folder.name.startswith("gguf-copy-")
    a, b = ref.state_dict(), w.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert w.model.lm_head.weight.data_ptr() == w.model.model.embed_tokens.weight.data_ptr()


def test_dtype_auto_is_what_the_checkpoint_stores(tmp_path):
    from numcast.models.hf_local import resolve_dtype
    from numcast.models.smollm2 import float_folder

    folder = _tiny_folder(tmp_path, "causal-lm")
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(config))
    assert resolve_dtype("auto", folder) == torch.bfloat16
    assert resolve_dtype("float16", folder) == torch.float16
    assert resolve_dtype("auto", float_folder()) == torch.float32  # a de-quantized GGUF: exact only in float32
    assert resolve_dtype("auto", None) == torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8", folder)
    model, _, _, _ = load_local_model(folder)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_quantize_in_bfloat16_reloads_bit_exactly_and_fp32_only_models_refuse(tmp_path, capsys):
    folder = _tiny_folder(tmp_path, "causal-lm")
    out = tmp_path / "run"
    assert main(["quantize", str(folder), "--weights", "mxfp4", "--method", "gptq", "--calibration", "2",
                 "--dtype", "bfloat16", "--out", str(out), "--no-progress", "--json"]) == 0  # fmt: skip
    rec = json.loads((out / "report.json").read_text())
    n_params = sum(p.numel() for p in load_local_model(folder)[0].parameters())  # tied weights once
    assert rec["dtype"] == "bfloat16" and rec["size_bytes"]["float"] == 2 * n_params  # the float size in bf16
    capsys.readouterr()
    assert main(["evaluate", str(out), "--json"]) == 0  # reloaded in bfloat16 (the packed file says so)
    assert json.loads(capsys.readouterr().out)["same"] is True
    assert main(["quantize", "fmnist-cnn", "--weights", "int8_channel", "--dtype", "bfloat16", "--out",
                 str(tmp_path / "fm")]) == 2  # fmt: skip
    assert "fmnist-cnn ships float32 weights" in capsys.readouterr().out
