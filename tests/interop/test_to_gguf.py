"""``numcast export --to gguf``, proven by its readers: PyPI ``gguf`` (``GGUFReader`` + ``gguf.quants.dequantize``,
llama.cpp's Python reference), transformers' GGUF loader (which undoes llama.cpp's q/k row permutation on its
own) and llama.cpp itself (``llama-perplexity``, where installed)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from helpers import assert_bitwise

import numcast
from numcast.interop.export import export_model
from numcast.interop.source import ExportSource
from numcast.interop.to_gguf import llama_row_order

gguf = pytest.importorskip("gguf")
tf = pytest.importorskip("transformers")


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer():
    from numcast.models.smollm2 import float_folder

    return tf.AutoTokenizer.from_pretrained(float_folder())


def tiny_causal_lm(model_type: str = "llama", seed: int = 0):
    """A random 2-layer causal LM with grouped-query attention (hidden 64, 4 heads, 2 KV heads) and SmolLM2's
    tokenizer (its vocabulary size)."""
    tok = smollm2_tokenizer()
    kw = dict(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, max_position_embeddings=256, tie_word_embeddings=False)  # fmt: skip
    config = tf.LlamaConfig(**kw) if model_type == "llama" else tf.Qwen2Config(**kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tf.AutoModelForCausalLM.from_config(config).eval()
    return model, tok


def export(model, tok, res, path, **kw):
    return export_model(ExportSource(model, "tiny", res.recipe, tok), "gguf", path, **kw)


def read(path):
    reader = gguf.GGUFReader(str(path))
    return reader, {t.name: t for t in reader.tensors}


def decoded(t) -> torch.Tensor:
    """A GGUF tensor as the reader decodes it, [out, in] float32."""
    arr = gguf.quants.dequantize(t.data, t.tensor_type)
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


SHORT = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
         "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}  # llama.cpp's tensor names
FORMATS = [("gguf_q4_0", "Q4_0"), ("int4_g64", "Q4_0"), ("gguf_q8_0", "Q8_0"), ("mxfp4", "MXFP4"), ("nvfp4", "NVFP4")]


@pytest.mark.parametrize("fmt, ggml", FORMATS)
def test_every_tensor_decodes_to_numcasts_weight_bit_for_bit(fmt, ggml, tmp_path):
    model, tok = tiny_causal_lm()
    res = numcast.quantize_model(model, fmt)
    out = export(model, tok, res, tmp_path / "m.gguf")
    reader, tensors = read(out.path)
    assert out.layers and set(out.layers.values()) == {ggml} and not out.float_layers
    n_q, n_kv = 4, 2
    for layer, module in model.named_modules():
        if layer not in out.layers:
            continue
        i = int(layer.split(".")[2])
        short = SHORT[layer.rsplit(".", 1)[1]]
        t = tensors[f"blk.{i}.{short}.weight"]
        assert t.tensor_type.name == ggml
        want = module.qweight.dequantize()
        if short == "attn_q":
            want = want[llama_row_order(want.shape[0], n_q)]
        if short == "attn_k":
            want = want[llama_row_order(want.shape[0], n_kv)]
        got = decoded(t)
        if fmt == "nvfp4":  # llama.cpp multiplies the FP32 tensor scale after the matmul
            got = got * torch.from_numpy(np.array(tensors[f"blk.{i}.{short}.scale"].data))
        assert_bitwise(got + 0.0, want + 0.0, layer)  # up to the sign of zero (ggml's E2M1 −0 decodes as +0)
    embedding = torch.from_numpy(np.array(tensors["token_embd.weight"].data))
    assert_bitwise(embedding, model.model.embed_tokens.weight.detach(), "embedding")
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["llama.block_count"].contents() == 2 and fields["llama.attention.head_count_kv"].contents() == 2
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(fields["tokenizer.ggml.tokens"].data) == len(tok)
    assert fields["tokenizer.ggml.bos_token_id"].contents() == tok.bos_token_id


def test_llama_row_order_is_the_converters_permutation():
    # convert_hf_to_gguf.py: w.reshape(n_head, 2, d/2, ...).swapaxes(1, 2).reshape(w.shape), written out by hand
    n_head, d = 3, 8
    want = [h * d + j * (d // 2) + i for h in range(n_head) for i in range(d // 2) for j in range(2)]
    assert llama_row_order(n_head * d, n_head).tolist() == want


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_transformers_gguf_reader_reloads_the_same_model(model_type, tmp_path):
    """transformers' GGUF loader de-quantizes with gguf.quants and undoes the q/k permutation itself: the model it
    builds has numcast's weights exactly and gives numcast's logits."""
    model, tok = tiny_causal_lm(model_type)
    res = numcast.quantize_model(model, "mxfp4")
    export(model, tok, res, tmp_path / "m.gguf")
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    for layer, module in model.named_modules():
        if hasattr(module, "qweight"):
            assert_bitwise(back.get_submodule(layer).weight.detach() + 0.0, module.qweight.dequantize() + 0.0, layer)
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, back(input_ids=ids).logits
    assert torch.allclose(a, b, rtol=0, atol=1e-5 * float(a.abs().max()))


def test_unsupported_formats_are_named_or_written_in_float(tmp_path):
    model, tok = tiny_causal_lm()
    res = numcast.quantize_model(model, "mxfp4", overrides=[{"pattern": "*.down_proj", "weights": "int4_channel"}])
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj \(int4_channel\).*--float-fallback"):
        export(model, tok, res, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()
    out = export(model, tok, res, tmp_path / "b.gguf", float_fallback=True)
    assert sorted(out.float_layers) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    _, tensors = read(out.path)
    t = tensors["blk.0.ffn_down.weight"]
    assert t.tensor_type.name == "F32"
    assert_bitwise(torch.from_numpy(np.array(t.data)), model.model.layers[0].mlp.down_proj.qweight.dequantize(), "down")


def test_refusals_and_determinism(tmp_path):
    model, tok = tiny_causal_lm()
    res = numcast.quantize_model(model, "gguf_q4_0")
    a = export(model, tok, res, tmp_path / "a.gguf").path
    with pytest.raises(FileExistsError, match="overwrite"):
        export(model, tok, res, a)
    b = export(model, tok, res, tmp_path / "b.gguf").path
    assert a.read_bytes() == b.read_bytes()
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    numcast.quantize_model(gpt2, "mxfp4")
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        export_model(ExportSource(gpt2, "gpt2", res.recipe, tok), "gguf", tmp_path / "c.gguf")
    with pytest.raises(ValueError, match="no quantized layer"):
        export_model(ExportSource(tiny_causal_lm()[0], "float", res.recipe, tok), "gguf", tmp_path / "d.gguf")


def test_gguf_q4_0_is_llama_cpps_q4_0_quantizer_where_its_scale_is_exact():
    """gguf.quants' Q4_0 quantizer (llama.cpp's reference) rounds with d = max/−8 before storing d as fp16; where
    that d is exact in fp16 and no value sits on a rounding tie, numcast's gguf_q4_0 writes the same bytes."""
    from numcast.interop.gguf_tensors import pack_gguf

    g = torch.Generator().manual_seed(0)
    rows = 64
    d = torch.tensor([2.0**k for k in range(-6, 2)]).repeat(rows // 8)[:, None]  # fp16-exact scales
    signs = torch.where(torch.rand(rows, 1, generator=g) < 0.5, -1.0, 1.0)
    q = torch.randint(-7, 8, (rows, 32), generator=g).float() + (torch.rand(rows, 32, generator=g) - 0.5) * 0.8
    q[:, :1] = -8.0  # the signed extreme: value −8·d
    w = (q * d * signs).float()
    ours = pack_gguf(numcast.quantize(w, "gguf_q4_0"), "w").data
    ref = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q4_0)
    assert np.array_equal(ours, ref)


def test_llama_cpp_perplexity_matches_numcast_under_the_same_protocol(tmp_path):
    """SmolLM2 at MXFP4 (RTN), exported with the shipped GGUF's metadata and tokenizer: llama.cpp's perplexity on
    2 windows of 512 tokens is within 2 % of numcast's on the same token ids (llama.cpp quantizes activations to
    Q8 in its dot products, so bit equality is not expected)."""
    from numcast.evaluate.text import chunked_perplexity, wiki_split
    from numcast.interop import llama_cpp
    from numcast.models.smollm2 import gguf_path, load_smollm2

    try:
        llama_cpp.find_tool("llama-perplexity")
    except FileNotFoundError as exc:
        pytest.skip(f"llama.cpp is not installed here: {exc}")
    model, tok = load_smollm2()
    res = numcast.quantize_model(model, "mxfp4")
    out = export_model(ExportSource(model, "smollm2-135m", res.recipe, tok, gguf_file=gguf_path()), "gguf",
                       tmp_path / "smollm2-mxfp4.gguf").path  # fmt: skip
    text = tmp_path / "eval.txt"
    text.write_text("\n\n".join(wiki_split()[1][:2]))
    ids = llama_cpp.tokenize(out, text)
    add_bos = bool(gguf.GGUFReader(str(out)).fields["tokenizer.ggml.add_bos_token"].contents())
    ours = chunked_perplexity(model, ids, 512, 2, tok.bos_token_id if add_bos else None)
    theirs = llama_cpp.perplexity(out, text, 512, 2)
    assert abs(theirs / ours - 1) < 0.02, (ours, theirs)
