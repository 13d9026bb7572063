"""The SmolLM2 adapter: GGUF -> float32 cache conversion, tied weights, a sane perplexity, the grid note."""

from __future__ import annotations

import pytest

from numcast.evaluate.text import perplexity, token_windows, wiki_split
from numcast.models.smollm2 import GGUF_GRID_NOTE, float_folder, load_smollm2, smollm2_blocks


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2()


def test_conversion_is_cached_and_weights_are_tied(smollm2):
    model, tok = smollm2
    folder = float_folder()
    assert (folder / "config.json").is_file() and "quantization_config" not in (folder / "config.json").read_text()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert len(smollm2_blocks(model)) == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


def test_perplexity_on_evaluation_text_is_sane(smollm2):
    model, tok = smollm2
    win = token_windows(tok, wiki_split()[1], 2, 128)
    assert win[0, 0].item() == tok.bos_token_id
    assert 5 < perplexity(model, win) < 80  # assets.md: ~22 on 8 x 512 tokens


def test_int4_g32_grid_note():
    from numcast.workloads import LOADERS

    assert "smollm2-135m" in LOADERS and "4-bit grid" in GGUF_GRID_NOTE
