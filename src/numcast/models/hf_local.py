"""Any local Hugging Face model folder or ``.gguf`` file as a PyTorch model (in the dtype its checkpoint stores,
or the one asked for: :func:`resolve_dtype`).

- A folder with ``config.json`` (and safetensors/bin weights plus a tokenizer) loads with ``transformers``:
  a decoder (``config.architectures`` names a ``...ForCausalLM`` class, or ``config.is_decoder``) as
  ``AutoModelForCausalLM``, anything else as an encoder (``AutoModel``).
- A ``.gguf`` file is de-quantized once by ``transformers``' GGUF reader into a float32 safetensors folder in
  the numcast cache (``$NUMCAST_CACHE`` or ``~/.cache/numcast``), named after the file's name, size and
  modification time, written to a temporary folder and renamed (an interrupted conversion never leaves a half
  cache). Later loads read that folder.

Nothing is fetched from a hub (``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from numcast.io import OutputDir
from numcast.models.assets import cache_root
from numcast.pipeline.blocks import repeated_layers
from numcast.pipeline.offload import ATTRIBUTE, DiskOffload, checkpoint_files

KINDS = ("causal-lm", "encoder")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)


def resolve_dtype(requested: str, folder: Path | None = None) -> torch.dtype:
    """The dtype to load a model in: ``requested`` (``float32``, ``bfloat16``, ``float16``), or for ``auto`` the
    dtype the checkpoint stores (``config.json``'s ``dtype`` / ``torch_dtype``; float32 when it says nothing or
    there is no folder). A ``.gguf`` source is de-quantized into a float32 folder first (:func:`convert_gguf`),
    so ``auto`` is float32 there: a de-quantized block value q·d (+ m) with FP16 d and m needs up to 4 + 11 + 11
    significant bits, more than float16's 11 or bfloat16's 8 hold. Unknown names raise ``ValueError``."""
    if requested not in DTYPE_CHOICES:
        raise ValueError(f"unknown dtype {requested!r}; one of {', '.join(DTYPE_CHOICES)}")
    if requested != "auto":
        return DTYPES[requested]
    stored = None
    if folder is not None and (Path(folder) / "config.json").is_file():
        import json

        config = json.loads((Path(folder) / "config.json").read_text())
        stored = config.get("dtype") or config.get("torch_dtype")
    return DTYPES.get(str(stored).removeprefix("torch."), torch.float32)


def is_model_path(name: str) -> bool:
    """True when ``name`` is an existing HF model folder (has config.json) or an existing .gguf file."""
    p = Path(name).expanduser()
    return (p.is_dir() and (p / "config.json").is_file()) or (p.is_file() and p.suffix.lower() == ".gguf")


def convert_gguf(src: Path, folder: Path) -> Path:
    """De-quantize the GGUF causal LM ``src`` into the float32 safetensors folder ``folder`` (atomically,
    :class:`numcast.io.OutputDir`: an existing ``folder`` is replaced only when numcast wrote it); returns
    ``folder``. Tied embeddings stay tied."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    gg = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    config = gg.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gg.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"{src}: GGUF conversion: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    with OutputDir(folder, overwrite=True) as out:  # replaces only an earlier conversion (it carries the marker)
        model.save_pretrained(out.tmp, safe_serialization=True)
        tok.save_pretrained(out.tmp)
    return folder


def gguf_float_folder(src: Path, cache: Path | None = None, name: str | None = None) -> Path:
    """The float32 folder of the GGUF file ``src`` in the cache, converted on first use. ``name`` overrides the
    cache folder's name (default: ``gguf-<stem>-<size>-<mtime_ns>``, so a changed file converts again)."""
    src = Path(src).expanduser().resolve()
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such GGUF file")
    st = src.stat()
    folder = (cache or cache_root()) / (name or f"gguf-{src.stem}-{st.st_size}-{st.st_mtime_ns}")
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder
    return convert_gguf(src, folder)


SUPPORTED = ("causal language models (any architecture transformers loads with AutoModelForCausalLM: Llama, "
             "Qwen2, Gemma, GPT-2, Phi, Mistral, ...) and text encoders with a masked-LM head (BERT, RoBERTa, "
             "MiniLM, ...)")


def model_kind(folder: Path) -> str:
    """'causal-lm' or 'encoder', from the folder's config.json: a causal LM by its declared architecture (one
    of transformers' causal-LM classes, e.g. ``GPT2LMHeadModel``) or ``is_decoder``; an encoder by a model
    type with a masked-LM head (BERT-like). Anything else (seq2seq, vision, audio) is refused naming it."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{folder}/config.json: not a readable Hugging Face config ({exc})") from exc
    archs = config.architectures or []
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if any(a in causal for a in archs) or getattr(config, "is_decoder", False):
        return "causal-lm"
    if not archs and config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and config.model_type not in \
            MODEL_FOR_MASKED_LM_MAPPING_NAMES:  # fmt: skip
        return "causal-lm"
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "encoder"
    raise ValueError(f"{folder}: a {config.model_type!r} model ({', '.join(archs) or 'no architectures listed'}) "
                     f"is not supported yet; numcast quantizes {SUPPORTED}")


OFFLOADS = ("none", "disk")


def load_offloaded(folder: Path, torch_dtype: torch.dtype) -> nn.Module:
    """A causal LM whose decoder layers stay on disk (:mod:`numcast.pipeline.offload`): the skeleton is built on
    the meta device (``accelerate.init_empty_weights``), the tensors outside the layers (embeddings, final norm,
    head) are read from the checkpoint, the layers' tensors are read when a forward or the runner reaches them.
    Returns the model in eval mode (its :class:`DiskOffload`: :func:`numcast.pipeline.offload.disk_offload_of`)."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    files = checkpoint_files(folder)
    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    blocks = transformer_blocks(model)
    prefixes = tuple(f"{n}." for n, m in model.named_modules() if any(m is b for b in blocks))
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for key in model.state_dict():
        if key.startswith(prefixes):
            continue
        if key not in files:
            if tied and key.endswith("lm_head.weight"):
                continue
            raise KeyError(f"{folder}: {key} is not in the checkpoint")
        with safe_open(str(files[key]), framework="pt") as f:
            value = f.get_tensor(key)
        value = value.to(torch_dtype) if value.is_floating_point() else value
        set_module_tensor_to_device(model, key, "cpu", value=value)
    if tied:
        model.tie_weights()
    offload = DiskOffload(files, torch_dtype)
    offload.attach(model, blocks)
    setattr(model, ATTRIBUTE, offload)
    return model.eval()


def load_local_model(path: str | Path, dtype: str = "auto", offload: str = "none"
                     ) -> tuple[nn.Module, object, str, Path]:  # fmt: skip
    """(model in eval mode, tokenizer, kind, folder) for a HF folder or a .gguf file, in ``dtype``
    (:func:`resolve_dtype`); ``offload="disk"`` keeps a causal LM's layers on disk (:func:`load_offloaded`).
    Errors name the folder and what is wrong (no config, no weights, unsupported architecture)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    p = Path(path).expanduser().resolve()
    if p.is_file() and p.suffix.lower() == ".gguf":
        p = gguf_float_folder(p)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p}: not a Hugging Face model folder (no config.json) nor a .gguf file")
    kind = model_kind(p)
    weights = [f for f in p.iterdir() if f.suffix in (".safetensors", ".bin") or f.name.endswith(".index.json")]
    if not weights:
        raise FileNotFoundError(f"{p}: no weights (model.safetensors, pytorch_model.bin or a sharded index) beside "
                                "config.json")  # fmt: skip
    auto = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
    torch_dtype = resolve_dtype(dtype, p)
    if offload not in OFFLOADS:
        raise ValueError(f"unknown offload {offload!r}; one of {', '.join(OFFLOADS)}")
    if offload == "disk" and kind != "causal-lm":
        raise ValueError(f"{p}: disk offload is for causal language models; this is an {kind}")
    try:
        if offload == "disk":
            model = load_offloaded(p, torch_dtype)
        else:
            model = auto.from_pretrained(p, dtype=torch_dtype).eval()
    except (OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{p}: transformers could not load the weights ({type(exc).__name__}: {exc})") from exc
    try:
        tok = AutoTokenizer.from_pretrained(p)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{p}: no usable tokenizer beside the model ({exc}); numcast measures text models on "
                         "text, so it needs the tokenizer files") from exc
    return model, tok, kind, p


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated layers in order (:func:`numcast.pipeline.blocks.repeated_layers`: Llama
    ``model.layers``, BERT ``encoder.layer``, GPT-2 ``transformer.h``, ...)."""
    best = repeated_layers(model)
    if not best:
        raise ValueError(f"{type(model).__name__}: found no list of repeated layers to quantize block by block")
    return best
