"""Real architectures that transformers ships, as tiny random-weight models built with ``from_config``: each
quantizes with RTN, GPTQ and Error Diffusion through ``numcast.quantize_model`` (blocks found automatically,
inputs from the model's own forward), every Linear-like layer in its blocks is quantized (GPT-2's Conv1D and
Mixtral's fused experts included), and the quantized model's forward stays close to the float one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import numcast
from numcast.nn.modules import QuantLinear

VOCAB = 128


def _tiny(arch: str) -> nn.Module:
    import transformers as tf

    common = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
    text = {"vocab_size": VOCAB, "max_position_embeddings": 512, **common}
    configs = {
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2, **text)),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(num_key_value_heads=2, **text)),
        "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(num_key_value_heads=2, head_dim=8,
                                                                   sliding_window=4, **text)),  # fmt: skip
        "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(num_key_value_heads=2, pad_token_id=0, **text)),
        "mixtral": lambda: tf.MixtralForCausalLM(tf.MixtralConfig(num_key_value_heads=2, num_local_experts=4,
                                                                  num_experts_per_tok=2, **text)),  # fmt: skip
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                                         n_positions=512, bos_token_id=0, eos_token_id=0)),
        "bert": lambda: tf.BertModel(tf.BertConfig(vocab_size=VOCAB, max_position_embeddings=512, **common)),
        "vit": lambda: tf.ViTModel(tf.ViTConfig(image_size=16, patch_size=4, **common)),
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return configs[arch]().eval()


def _batches(arch: str, n: int = 2) -> list:
    g = torch.Generator().manual_seed(1)
    if arch == "vit":
        return [{"pixel_values": torch.randn(2, 3, 16, 16, generator=g)} for _ in range(n)]
    return [{"input_ids": torch.randint(1, VOCAB, (2, 16), generator=g)} for _ in range(n)]


def _output(model: nn.Module, batch) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).double()


ARCHS = ["llama", "qwen2", "gemma3", "phi3", "mixtral", "gpt2", "bert", "vit"]


@pytest.mark.parametrize("method", ["rtn", "gptq", "error-diffusion"])
@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_architecture_quantizes_and_stays_close(arch, method):
    model = _tiny(arch)
    data = _batches(arch)
    ref = _output(model, data[0])
    res = numcast.quantize_model(model, "int8_channel", data, method=method)
    blocks = [r for r in res.layers if any(t in f".{r.name}" for t in (".layers.", ".layer.", ".h."))]
    quantized = [r for r in blocks if r.action == "quantized"]
    assert quantized and all(r.method.startswith(method) or r.method.startswith("rtn") for r in quantized)
    # every Linear-like layer inside the blocks is quantized (norms, routers stay in float with a reason)
    assert not [r.name for r in blocks if r.action == "skipped" and "norm" not in r.reason.lower()
                and "router" not in r.reason.lower()]  # fmt: skip
    assert all(isinstance(m, QuantLinear) for n, m in model.named_modules() if isinstance(m, nn.Linear) and
               any(n == r.name for r in quantized))  # fmt: skip
    got = _output(model, data[0])
    cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0)
    assert cos > 0.99, f"{arch}/{method}: cosine {float(cos):.4f}"
    if arch == "gpt2":
        assert any(r.name.endswith("attn.c_attn") for r in quantized)  # Conv1D, as a Linear
    if arch == "mixtral":
        experts = [r for r in quantized if ".experts." in r.name]
        assert len(experts) == 2 * 4 * 2  # layers x experts x (gate_up, down)


def test_an_expert_without_calibration_tokens_gets_rtn_and_a_warning():
    import transformers as tf

    cfg = tf.MixtralConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=64, num_local_experts=8, num_experts_per_tok=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tf.MixtralForCausalLM(cfg).eval()
    data = [{"input_ids": torch.tensor([[3, 4, 5]])}]  # 3 tokens, top-1: at most 3 of 8 experts see one
    with pytest.warns(UserWarning, match=r"experts\.(gate_up|down)\.\d: no calibration input reached this layer"):
        res = numcast.quantize_model(model, "int8_channel", data, method="gptq")
    methods = {r.method for r in res.layers if ".experts." in r.name}
    assert methods == {"gptq", "rtn (no calibration inputs)"}
    assert all(r.action == "quantized" for r in res.layers if ".experts." in r.name)


def test_the_quantized_hugging_face_model_still_generates():
    model = _tiny("llama")
    data = _batches("llama")
    numcast.quantize_model(model, "int8_channel", data, method="gptq")
    out = model.generate(data[0]["input_ids"][:1], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 19)


TEXT_ARCHS = ["llama", "qwen2", "gemma3", "phi3", "mixtral", "gpt2", "bert"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each text architecture saved as a local Hugging Face folder with a shipped tokenizer (SmolLM2's for the
    causal LMs, MiniLM's for BERT), built on demand."""
    from transformers import AutoTokenizer

    from numcast.models.minilm import model_dir
    from numcast.models.smollm2 import float_folder

    made: dict[str, object] = {}

    def get(arch: str):
        if arch not in made:
            tok = AutoTokenizer.from_pretrained(model_dir() if arch == "bert" else float_folder())
            global VOCAB
            old, VOCAB = VOCAB, len(tok)
            try:
                model = _tiny(arch)
            finally:
                VOCAB = old
            folder = tmp_path_factory.mktemp(arch)
            model.save_pretrained(folder)
            tok.save_pretrained(folder)
            made[arch] = folder
        return made[arch]

    return get


@pytest.mark.parametrize("method", ["rtn", "gptq", "error-diffusion"])
@pytest.mark.parametrize("arch", TEXT_ARCHS)
def test_tiny_architecture_through_the_cli(arch, method, folders, tmp_path, capsys):
    import json

    from numcast.cli import main

    folder = folders(arch)
    out = tmp_path / "q"
    assert main(["quantize", str(folder), "--weights", "int8_channel", "--method", method, "--calibration", "2",
                 "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    rec = json.loads((out / "report.json").read_text())
    assert rec["primary_metric"] == ("embedding_cosine" if arch == "bert" else "perplexity")
    inside = [r for r in rec["layers"] if r["action"] == "quantized" and any(t in f".{r['name']}" for t in
              (".layers.", ".layer.", ".h."))]  # fmt: skip
    assert inside and all(r["method"].startswith((method, "rtn")) for r in inside)
    if method == "gptq":  # the packed model reloads onto a fresh float model (Conv1D / experts converted again)
        assert main(["evaluate", str(out)]) == 0
        assert "bit-exact" in capsys.readouterr().out


def test_save_pretrained_writes_the_packed_model_not_a_checkpoint_missing_its_weights(tmp_path):
    """transformers' own save_pretrained would drop the quantized layers' weights (packed codes, not parameters)
    and from_pretrained would fill them with random values; on a numcast model it writes numcast's packed form."""
    import transformers as tf

    from numcast.pipeline.export import load_quantized

    model = _tiny("llama")
    data = _batches("llama")
    numcast.quantize_model(model, "int4_g32", data, method="gptq")
    model.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["model.safetensors", "recipe.yaml"]
    again = load_quantized(_tiny("llama"), tmp_path / "saved" / "model.safetensors")
    assert torch.equal(_output(again, data[0]), _output(model, data[0]))
    with pytest.raises((OSError, ValueError)):
        tf.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")  # no config.json: refused, never random
