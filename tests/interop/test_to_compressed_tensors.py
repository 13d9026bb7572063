"""numcast models as compressed-tensors folders, proven by the reader: transformers loads each exported folder on
the CPU through compressed-tensors (``CompressedTensorsConfig(dequantize=True)``) and every weight, every float
tensor and the logits on real text are numcast's; the stored codes and scales also go through compressed-tensors'
own unpack functions (``unpack_from_int32``, ``unpack_fp4_from_uint8``, ``unpack_fp6_from_uint8``,
``decompress_mx_scale``)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import assert_bitwise

import numcast
from numcast.formats.element import decode
from numcast.interop.export import export_model
from numcast.interop.source import ExportSource
from numcast.interop.to_compressed_tensors import compress_layer
from numcast.nn.modules import QuantConv2d, QuantLinear, QuantWeightModule

pytest.importorskip("compressed_tensors")
tf = pytest.importorskip("transformers")
ct_pack = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
ct_fp4 = pytest.importorskip("compressed_tensors.compressors.nvfp4.helpers")
ct_fp6 = pytest.importorskip("compressed_tensors.compressors.mxfp6.helpers")
ct_mx = pytest.importorskip("compressed_tensors.compressors.mx_utils")
safetensors_torch = pytest.importorskip("safetensors.torch")

TEXT = ("The river flows past the old mill, where the miller once ground wheat for the village. "
        "In spring the water rises and floods the meadows along its banks.")  # fmt: skip

# numcast format -> the compressed-tensors format it is written as
FORMATS = {
    "int4_g128": "pack-quantized",
    "uint4_g128_zp": "pack-quantized",
    "int8_channel": "pack-quantized",
    "int8_g32": "pack-quantized",
    "mxint8": "pack-quantized",
    "fp8_e4m3_channel": "float-quantized",
    "fp8_e4m3_tensor": "float-quantized",
    "mxfp8_e4m3": "mxfp8-quantized",
    "mxfp6_e2m3": "mxfp6-pack-quantized",
    "mxfp4": "mxfp4-pack-quantized",
    "nvfp4": "nvfp4-pack-quantized",
}
N_QUANTIZED = 14  # 2 layers x (q, k, v, o, gate, up, down); embeddings and the LM head stay in float


def tiny_llama(vocab: int, tie: bool = False):
    """A 2-layer random-weight Llama (seeded, the global RNG untouched) 128 wide, so that groups of 128 tile its
    inputs (``helpers.tiny_llama_folder``'s model is 32 wide)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=256, tie_word_embeddings=tie)  # fmt: skip
        return tf.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tok():
    from numcast.models.smollm2 import float_folder

    return tf.AutoTokenizer.from_pretrained(float_folder())


@pytest.fixture(scope="module")
def ids(tok):
    return tok(TEXT, return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def base(tok):
    """Tied input and output embeddings, as SmolLM2's."""
    return tiny_llama(len(tok), tie=True)


def export(model, recipe, tok, out, **kw):
    source = ExportSource(model=model, name="tiny-llama", recipe=recipe, tokenizer=tok)
    return export_model(source, "compressed-tensors", out, **kw)


@pytest.fixture(scope="module")
def exported(base, tok, tmp_path_factory):
    """fmt -> (numcast's quantized model, the exported folder, the ExportResult, the recipe), each exported once."""
    cache = {}

    def get(fmt):
        if fmt not in cache:
            model = copy.deepcopy(base)
            res = numcast.quantize_model(model, fmt)
            out = tmp_path_factory.mktemp("ct") / fmt
            cache[fmt] = (model, out, export(model, res.recipe, tok, out), res.recipe)
        return cache[fmt]

    return get


def reload(folder, dequantize: bool = True):
    """The reader: transformers + compressed-tensors, on the CPU."""
    return tf.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=tf.CompressedTensorsConfig(dequantize=dequantize)
    ).eval()


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def rel_diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


def quantized(model) -> dict[str, QuantWeightModule]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantWeightModule)}


def qconfig(folder) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_transformers_reloads_numcasts_weights_and_logits(fmt, exported, ids):
    model, folder, result, _ = exported(fmt)
    q = qconfig(folder)
    assert q["quant_method"] == "compressed-tensors" and q["quantization_status"] == "compressed"
    assert q["format"] == FORMATS[fmt]
    (group,) = q["config_groups"].values()
    assert group["format"] == FORMATS[fmt] and group["targets"] == ["Linear"]
    assert q["ignore"] == ["model.embed_tokens", "lm_head"]  # the layers numcast kept in float
    layers = quantized(model)
    assert len(layers) == N_QUANTIZED and sorted(result.layers) == sorted(layers) and not result.float_layers
    assert all(label.startswith(FORMATS[fmt]) for label in result.layers.values())

    reloaded = reload(folder)
    got = reloaded.state_dict()
    # The reader decodes NVFP4 in bfloat16 (unpack_fp4_from_uint8's dtype; transformers then casts to float32):
    # numcast's weight rounded to bfloat16. Every other format comes back bit for bit.
    reader_dtype = torch.bfloat16 if fmt == "nvfp4" else torch.float32
    for name, m in layers.items():
        assert_bitwise(got[f"{name}.weight"], m.qweight.dequantize().to(reader_dtype).float(), f"{fmt} {name}")
    for key, value in model.state_dict().items():  # embeddings, norms, LM head: as they were
        assert torch.equal(got[key].view(torch.int32), value.view(torch.int32)), key

    ref_model = model
    if reader_dtype != torch.float32:  # numcast's model, its weights in the reader's dtype
        ref_model = copy.deepcopy(model)
        for m in quantized(ref_model).values():
            m.weight = m.weight.to(reader_dtype).float()
    assert rel_diff(logits(reloaded, ids), logits(ref_model, ids)) <= 1e-5


def test_nvfp4_is_numcasts_model_up_to_the_readers_bfloat16(exported, ids):
    """The NVFP4 reload is not numcast's float32 model (the reader rounds the weights to bfloat16), which is why
    the test above compares it with numcast's weights in bfloat16."""
    model, folder, _, _ = exported("nvfp4")
    assert rel_diff(logits(reload(folder), ids), logits(model, ids)) > 1e-5


@pytest.mark.parametrize("fmt", FORMATS)
def test_codes_and_scales_through_compressed_tensors_unpack(fmt, exported):
    model, folder, _, _ = exported(fmt)
    name = "model.layers.1.mlp.down_proj"  # [128, 256]
    qt = model.get_submodule(name).qweight
    stored = safetensors_torch.load_file(folder / "model.safetensors")
    t = {k.removeprefix(f"{name}."): v for k, v in stored.items() if k.startswith(f"{name}.")}
    el, (out, n_in) = qt.format.element, qt.shape
    scales = qt.scales()
    if FORMATS[fmt] == "pack-quantized":
        bits, codes = el.bits, qt.codes.long()
        assert t["weight_shape"].tolist() == [out, n_in]
        unpacked = ct_pack.unpack_from_int32(t["weight_packed"], bits, t["weight_shape"]).long()
        if el.signed:  # two's complement codes -> values
            assert torch.equal(unpacked, torch.where(codes >= 2 ** (bits - 1), codes - 2**bits, codes))
        else:  # unsigned codes and zero points shifted by -2^(b-1): the same q - z
            assert torch.equal(unpacked, codes - 2 ** (bits - 1))
            groups = t["weight_scale"].shape[1]
            zp = ct_pack.unpack_from_int32(t["weight_zero_point"], bits, (out, groups), packed_dim=0)
            assert torch.equal(zp.long(), qt.zero_point.reshape(out, -1) - 2 ** (bits - 1))
        assert t["weight_scale"].dtype == torch.float32  # exact: FP16 / E8M0 values, times 2^-6 for MXINT8
        assert torch.equal(t["weight_scale"].double().flatten(), scales.flatten() * 2.0**-el.frac_bits)
        return
    values = decode(qt.codes, el, torch.float32)
    if fmt in ("mxfp4", "nvfp4"):
        assert_bitwise(ct_fp4.unpack_fp4_from_uint8(t["weight_packed"], out, n_in, dtype=torch.float32), values, fmt)
    elif fmt == "mxfp6_e2m3":
        assert_bitwise(ct_fp6.unpack_fp6_from_uint8(t["weight_packed"], out, n_in, dtype=torch.float32), values, fmt)
    else:
        assert t["weight"].dtype == torch.float8_e4m3fn
        assert_bitwise(t["weight"].float(), values, fmt)
    if fmt.startswith("mx"):
        assert t["weight_scale"].dtype == torch.uint8 and t["weight_scale"].shape == (out, n_in // 32)
        assert torch.equal(ct_mx.decompress_mx_scale(t["weight_scale"]).double(), scales)
    elif fmt == "nvfp4":
        assert t["weight_scale"].dtype == torch.float8_e4m3fn and t["weight_scale"].shape == (out, n_in // 16)
        assert torch.equal(t["weight_scale"].double(), scales)
        assert t["weight_global_scale"].tolist() == [torch.tensor(1 / qt.tensor_scale, dtype=torch.float32).item()]
    else:
        assert torch.equal(t["weight_scale"].double().flatten(), scales.flatten())


def test_mixed_precision_writes_one_group_per_scheme(base, tok, ids, tmp_path):
    model = copy.deepcopy(base)
    overrides = [{"pattern": "*.mlp.*", "weights": "int8_channel"},
                 {"pattern": "*.o_proj", "weights": "fp8_e4m3_channel"}]  # fmt: skip
    res = numcast.quantize_model(model, "int4_g128", overrides=overrides)
    export(model, res.recipe, tok, tmp_path / "ct")
    q = qconfig(tmp_path / "ct")
    assert q["format"] == "mixed-precision"
    layers = quantized(model)
    by_format: dict[str, list[str]] = {}
    for name, m in layers.items():
        by_format.setdefault(m.qweight.format.name, []).append(name)
    groups = [(g["format"], g["weights"]["num_bits"], g["targets"]) for g in q["config_groups"].values()]
    assert groups == [("pack-quantized", 4, by_format["int4_g128"]),
                      ("float-quantized", 8, by_format["fp8_e4m3_channel"]),
                      ("pack-quantized", 8, by_format["int8_channel"])]  # fmt: skip
    # compressed-tensors' own per-layer path (decompressed on the first forward). transformers 5's dequantize=True
    # path decodes every layer with the first group's scheme (get_dense_scheme), so it cannot read mixed folders.
    reloaded = reload(tmp_path / "ct", dequantize=False)
    assert rel_diff(logits(reloaded, ids), logits(model, ids)) <= 1e-5
    for name, m in layers.items():
        assert_bitwise(reloaded.get_submodule(name).weight.detach(), m.qweight.dequantize(), name)


@pytest.mark.parametrize("fmt, why", [
    ("int3_g64", "3-bit integers"),
    ("uint4_g128", "unsigned integers without a zero point"),
    ("int4_g96", "256 inputs are not whole groups of 96"),
    ("mxfp6_e3m2", "no compressed-tensors scheme"),
    ("fp8_e5m2_channel", "no compressed-tensors scheme"),
])  # fmt: skip
def test_a_format_the_reader_cannot_store_is_refused_naming_the_layer(fmt, why, base, tok, tmp_path):
    model = copy.deepcopy(base)
    res = numcast.quantize_model(model, "int4_g128", overrides=[{"pattern": "*.down_proj", "weights": fmt}])
    with pytest.raises(ValueError, match=rf"model\.layers\.0\.mlp\.down_proj \({fmt}: .*{why}"):
        export(model, res.recipe, tok, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_float_fallback_writes_the_dequantized_weight_and_ignores_it(tok, ids, tmp_path):
    model = tiny_llama(len(tok), tie=False)  # untied: the LM head is written as its own tensor
    res = numcast.quantize_model(model, "int4_g128", overrides=[{"pattern": "*.down_proj", "weights": "int3_g64"}])
    result = export(model, res.recipe, tok, tmp_path / "ct", float_fallback=True)
    fallback = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert sorted(result.float_layers) == fallback
    assert all(why.startswith("int3_g64: 3-bit integers") for why in result.float_layers.values())
    assert len(result.layers) == N_QUANTIZED - 2
    assert qconfig(tmp_path / "ct")["ignore"] == ["model.embed_tokens", *fallback, "lm_head"]
    stored = safetensors_torch.load_file(tmp_path / "ct" / "model.safetensors")
    assert f"{fallback[0]}.weight" in stored and f"{fallback[0]}.weight_packed" not in stored
    assert "lm_head.weight" in stored
    reloaded = reload(tmp_path / "ct")
    for name, m in quantized(model).items():  # the fallback layers hold numcast's dequantized int3 weights
        assert_bitwise(reloaded.get_submodule(name).weight.detach(), m.qweight.dequantize(), name)
    assert rel_diff(logits(reloaded, ids), logits(model, ids)) <= 1e-5


def test_a_tie_numcast_broke_is_written_untied(base, tok, ids, tmp_path):
    """The embedding quantized, the LM head float (numcast keeps LM heads in float): two tensors and
    ``tie_word_embeddings: false``, so transformers does not re-tie them."""
    model = copy.deepcopy(base)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    res = numcast.quantize_model(model, "int4_g128", quantize_embeddings=True)
    export(model, res.recipe, tok, tmp_path / "ct")
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    stored = safetensors_torch.load_file(tmp_path / "ct" / "model.safetensors")
    assert not cfg.get("tie_word_embeddings", False)
    assert "lm_head.weight" in stored and "model.embed_tokens.weight_packed" in stored
    (group,) = cfg["quantization_config"]["config_groups"].values()
    assert group["targets"] == ["Embedding", "Linear"] and cfg["quantization_config"]["ignore"] == ["lm_head"]
    reloaded = reload(tmp_path / "ct")
    assert_bitwise(reloaded.model.embed_tokens.weight.detach(), model.model.embed_tokens.qweight.dequantize())
    assert rel_diff(logits(reloaded, ids), logits(model, ids)) <= 1e-5


def test_the_folder_holds_config_tokenizer_and_generation_config(exported, tok):
    _, folder, _, _ = exported("int4_g128")
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["dtype"] == "float32"
    # the tie numcast kept: stored once, as save_pretrained does, and re-tied by transformers
    assert cfg["tie_word_embeddings"] is True
    stored = safetensors_torch.load_file(folder / "model.safetensors")
    assert "lm_head.weight" not in stored and "model.embed_tokens.weight" in stored
    reloaded = reload(folder)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert tf.AutoTokenizer.from_pretrained(folder)(TEXT).input_ids == tok(TEXT).input_ids


@pytest.mark.parametrize("fmt", ["uint4_g128_zp", "nvfp4"])
def test_the_same_model_gives_the_same_bytes(fmt, exported, tok, tmp_path):
    model, folder, result, recipe = exported(fmt)
    again = export(model, recipe, tok, tmp_path / "again")
    assert again.layers == result.layers
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "again").iterdir())
    for name in names:
        assert (folder / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name


def test_activation_quantization_is_refused(base, tok, tmp_path):
    model = copy.deepcopy(base)
    res = numcast.quantize_model(model, "int4_g128", activations="fp8_e4m3_tensor")
    with pytest.raises(ValueError, match="activations='fp8_e4m3_tensor'.*weight-only"):
        export(model, res.recipe, tok, tmp_path / "ct")


def test_a_model_without_a_transformers_config_is_refused(tmp_path):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    res = numcast.quantize_model(model, "int4_g32")
    with pytest.raises(ValueError, match=r"Sequential has no Hugging Face transformers config.*config\.json"):
        export(model, res, None, tmp_path / "ct")


def test_layers_the_reader_would_change_are_refused():
    """compressed-tensors decodes MX formats in bfloat16: a value bfloat16 cannot hold (an E8M0 scale at the
    bottom of the range times a subnormal element) is refused rather than silently flushed; and it compresses
    Linear and Embedding weights only."""
    lin = torch.nn.utils.skip_init(torch.nn.Linear, 64, 2)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[0, :2] = torch.tensor([2.0**-118, 2.0**-135])  # scale 2^-126; 2^-135 = 2^-9 (min E4M3) x 2^-126
        lin.weight[1] = 0.5
    with pytest.raises(ValueError, match="1 values are not bfloat16 numbers"):
        compress_layer(QuantLinear(lin, "mxfp8_e4m3"))
    conv = torch.nn.utils.skip_init(torch.nn.Conv2d, 4, 4, 3)
    with torch.no_grad():
        conv.weight.fill_(0.1)
    with pytest.raises(ValueError, match="QuantConv2d: compressed-tensors compresses Linear and Embedding weights"):
        compress_layer(QuantConv2d(conv, "int8_channel"))
