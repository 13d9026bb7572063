"""A quantized causal LM as one GGUF file for llama.cpp, holding numcast's own codes and scales.

Layout (``../shared/design/interop.md`` §1; the reader is llama.cpp, ``src/llama-model.cpp`` and
``ggml/src/ggml-common.h``; the writer is PyPI ``gguf``'s ``GGUFWriter``):

- **Architectures**: Hugging Face ``model_type`` ``llama`` and ``mistral`` → GGUF ``llama`` (q_proj/k_proj rows
  permuted as llama.cpp's ``convert_hf_to_gguf.py`` does: within each head, from the two-halves RoPE layout
  of Hugging Face to llama.cpp's interleaved pairs; a row permutation, so codes and per-row block scales move
  together and nothing is re-quantized), ``qwen2`` → GGUF ``qwen2`` (no permutation). Tensor names come from
  ``gguf.TensorNameMap``. Other architectures are refused naming their ``model_type``.
- **Quantized layers** (:func:`numcast.interop.gguf_tensors.pack_gguf`): int4 / int8 with FP16 group scales
  (groups of 32·k, incl. ``gguf_q4_0`` / ``gguf_q8_0``) → Q4_0 / Q8_0, ``mxfp4`` → MXFP4, ``nvfp4`` → NVFP4
  plus its FP32 tensor scale as the F32[1] tensor ``blk.N.<name>.scale`` that llama.cpp multiplies after
  the matmul. Anything else raises ``ValueError`` naming the layer and format, or with ``float_fallback`` is
  written as F32 (listed in the result).
- **Float tensors** (norms, embeddings, an unquantized LM head) are written as F32: the values numcast
  evaluated, exactly. A tied LM head is not written (llama.cpp reuses ``token_embd``).
- **Metadata and tokenizer**: when the model came from a GGUF file (``ExportSource.gguf_file``), every key of
  that file but the file type and quantization version is copied (its tokenizer, pre-tokenizer, chat
  template); the architecture and shape keys are checked against the model's config. Otherwise they are
  built from the config the way ``convert_hf_to_gguf.py`` does (context/embedding/feed-forward lengths, head
  counts, RoPE base and dimension, RMSNorm epsilon) and the tokenizer from its ``tokenizer.json``
  (``gguf.vocab.BpeVocab`` for byte-level BPE, ``SentencePieceVocab`` for ``tokenizer.model``; special tokens
  and merges by ``gguf.SpecialVocab``). ``convert_hf_to_gguf.py`` names the pre-tokenizer by hashing a probe
  text against its own table; numcast does not carry that table, so ``tokenizer.ggml.pre`` is written only
  when the source GGUF has it (llama.cpp otherwise uses its default BPE pre-tokenizer and says so).
- ``general.file_type`` is the llama.cpp file type of the most common quantized type; ``general.quantized_by``
  is ``numcast`` and ``numcast.recipe`` the recipe (JSON).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from numcast.interop.gguf_tensors import MXFP4, NVFP4, Q4_0, Q8_0, TYPE_NAMES, gguf_type, pack_gguf
from numcast.interop.source import ExportResult, ExportSource, quantized_layers

# Hugging Face model_type -> (GGUF architecture, permute q/k rows as convert_hf_to_gguf's LlamaModel)
ARCHITECTURES: dict[str, tuple[str, bool]] = {"llama": ("llama", True), "mistral": ("llama", True),
                                              "qwen2": ("qwen2", False)}  # fmt: skip
FILE_TYPES = {Q4_0: 2, Q8_0: 7, MXFP4: 38, NVFP4: 39}  # gguf.LlamaFileType.MOSTLY_*
_SKIPPED_KEYS = ("GGUF.", "general.architecture", "general.file_type", "general.quantization_version")


@dataclass
class _Tensor:
    name: str  # GGUF name
    data: np.ndarray
    raw_type: int | None = None  # GGML type id of packed blocks, None for F32


def write_gguf(source: ExportSource, path: Path, float_fallback: bool) -> ExportResult:
    """Write ``source`` (a quantized Hugging Face causal LM) as the GGUF file ``path`` (module docstring)."""
    import gguf

    model = source.model
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__}: GGUF export needs a Hugging Face causal LM (with a config)")
    if config.model_type not in ARCHITECTURES:
        raise ValueError(f"GGUF export: model_type {config.model_type!r} is not supported; numcast writes "
                         f"{', '.join(ARCHITECTURES)} (llama.cpp architectures llama and qwen2)")  # fmt: skip
    arch, permute = ARCHITECTURES[config.model_type]
    result = ExportResult(path, "gguf")
    tensors = _tensors(model, config, arch, permute, float_fallback, result)
    writer = gguf.GGUFWriter(str(path), arch)
    if source.gguf_file is not None:
        _copy_metadata(writer, Path(source.gguf_file), arch, config)
    else:
        _config_metadata(writer, config, arch)
        _tokenizer_metadata(writer, source.tokenizer, config)
    kinds = Counter(t.raw_type for t in tensors if t.raw_type is not None)
    writer.add_file_type(FILE_TYPES[kinds.most_common(1)[0][0]] if kinds else 0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_quantized_by("numcast")
    writer.add_string("numcast.recipe", source.recipe.model_dump_json())
    for t in tensors:
        if t.raw_type is None:
            writer.add_tensor(t.name, t.data)
        else:
            writer.add_tensor(t.name, t.data, raw_dtype=gguf.GGMLQuantizationType(t.raw_type))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return result


def llama_row_order(rows: int, n_head: int) -> torch.Tensor:
    """The row order llama.cpp's converter gives a Llama q_proj (``n_head`` heads) or k_proj (``n_head_kv``):
    within each head of ``d = rows / n_head`` rows, new row ``2i + j`` = old row ``j·d/2 + i`` (``permute`` in
    ``convert_hf_to_gguf.py``)."""
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows do not split into {n_head} heads of an even size")
    return torch.arange(rows).reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(-1)


def _row_orders(config, permute: bool) -> dict[str, torch.Tensor]:
    """GGUF tensor name suffix → row order, for the tensors the converter permutes."""
    if not permute:
        return {}
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    q, k = llama_row_order(n_head * head_dim, n_head), llama_row_order(n_kv * head_dim, n_kv)
    return {"attn_q.weight": q, "attn_q.bias": q, "attn_k.weight": k, "attn_k.bias": k}  # a bias moves with its rows


def _tensors(model: nn.Module, config, arch: str, permute: bool, float_fallback: bool,
             result: ExportResult) -> list[_Tensor]:  # fmt: skip
    """Every tensor of the GGUF file, in the model's state-dict order (quantized layers at their weight)."""
    import gguf

    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    orders = _row_orders(config, permute)
    quantized = quantized_layers(model)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out: list[_Tensor] = []
    for key, value in _entries(model, quantized):
        if tied and key == "lm_head.weight" and value is not None:
            continue  # llama.cpp reuses token_embd
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"GGUF export: no llama.cpp tensor name for {key!r} ({arch})")
        order = next((o for suffix, o in orders.items() if name.endswith(suffix)), None)
        if value is None:
            layer = key[: -len(".weight")]
            out.extend(_quantized(layer, quantized[layer], name, order, float_fallback, result))
        else:
            w = value.detach().to(torch.float32)
            out.append(_Tensor(name, (w[order] if order is not None else w).contiguous().numpy()))
    return out


def _entries(model: nn.Module, quantized: dict[str, nn.Module]) -> list[tuple[str, torch.Tensor | None]]:
    """(Hugging Face key, float tensor) in module order; a quantized layer's weight (not a parameter) as
    (``<layer>.weight``, None). Non-persistent buffers (RoPE's inv_freq) are not in the state dict: skipped."""
    state = model.state_dict()
    entries: list[tuple[str, torch.Tensor | None]] = []
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if mod_name in quantized:
            entries.append((f"{prefix}weight", None))
        local = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        entries += [(prefix + n, state[prefix + n]) for n, _ in local if prefix + n in state]
    return entries


def _quantized(layer: str, module: nn.Module, name: str, order: torch.Tensor | None, float_fallback: bool,
               result: ExportResult) -> list[_Tensor]:  # fmt: skip
    """The GGUF tensor(s) of one quantized layer: packed blocks (+ NVFP4's ``.scale``), or F32 under
    ``float_fallback`` when GGUF has no type for its format."""
    qt = module.qweight
    kind, why = gguf_type(qt.format)
    if kind is None or len(qt.shape) != 2:
        why = why or f"a {len(qt.shape)}-D weight (GGUF matrices are 2-D)"
        if not float_fallback:
            raise ValueError(f"GGUF export: layer {layer} ({qt.format.label}): {why}; pass --float-fallback to write "
                             "it unquantized")  # fmt: skip
        w = qt.dequantize().to(torch.float32)
        result.float_layers[layer] = why
        return [_Tensor(name, (w[order] if order is not None else w).contiguous().numpy())]
    packed = pack_gguf(qt, layer)
    data = packed.data if order is None else packed.data[order.numpy()]
    result.layers[layer] = packed.type_name
    tensors = [_Tensor(name, np.ascontiguousarray(data), packed.ggml_type)]
    if packed.tensor_scale is not None:
        base = name[: -len(".weight")] if name.endswith(".weight") else name
        tensors.append(_Tensor(f"{base}.scale", np.array([packed.tensor_scale], dtype=np.float32)))
    return tensors


def _copy_metadata(writer, src: Path, arch: str, config) -> None:
    """Every key of the source GGUF but those describing its own quantization; the shapes checked against
    ``config`` so that a model and a foreign file are never mixed."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    fields = reader.fields
    src_arch = fields["general.architecture"].contents()
    if src_arch != arch:
        raise ValueError(f"{src}: a {src_arch!r} GGUF, but the model is {config.model_type!r} (GGUF {arch!r})")
    expected = {f"{arch}.block_count": config.num_hidden_layers, f"{arch}.embedding_length": config.hidden_size}
    for key, want in expected.items():
        got = fields[key].contents() if key in fields else None
        if got != want:
            raise ValueError(f"{src}: {key} = {got}, but the model has {want}: not this model's GGUF")
    for key, field in fields.items():
        if key.startswith(_SKIPPED_KEYS):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub)


def _config_metadata(writer, config, arch: str) -> None:
    """The hyperparameters llama.cpp reads, from the Hugging Face config (as ``convert_hf_to_gguf.py``)."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") not in ("default", None):
        raise ValueError(f"GGUF export: RoPE scaling {rope.get('rope_type')!r} is not written by numcast's GGUF "
                         "exporter (it needs llama.cpp's rope_freqs tensor); pass a source GGUF")  # fmt: skip
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    writer.add_name(str(getattr(config, "_name_or_path", "") or config.model_type))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or n_head)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)


def _tokenizer_metadata(writer, tokenizer, config) -> None:
    """Tokens, types, scores, merges and special tokens from the tokenizer's own files (module docstring)."""
    import gguf

    if tokenizer is None:
        raise ValueError("GGUF export needs the model's tokenizer (or a source GGUF to copy it from)")
    with tempfile.TemporaryDirectory(prefix="numcast-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        folder = Path(tmp)
        if (folder / "tokenizer.model").is_file():
            vocab, model = gguf.vocab.SentencePieceVocab(folder), "llama"
        else:
            try:
                vocab, model = gguf.vocab.BpeVocab(folder), "gpt2"
            except FileNotFoundError as exc:
                raise ValueError(f"GGUF export: the tokenizer is neither byte-level BPE nor SentencePiece ({exc}); "
                                 "pass a source GGUF to copy llama.cpp's tokenizer from") from exc  # fmt: skip
        tokens, scores, types = [], [], []
        for text, score, kind in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(kind)
        while len(tokens) < config.vocab_size:  # embedding rows past the tokenizer's vocabulary
            tokens.append(f"[PAD{len(tokens)}]")
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model(model)
        writer.add_token_list(tokens)
        if model == "llama":
            writer.add_token_scores(scores)
        writer.add_token_types(types)
        gguf.SpecialVocab(folder, load_merges=model == "gpt2", n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


__all__ = ["ARCHITECTURES", "TYPE_NAMES", "llama_row_order", "write_gguf"]
