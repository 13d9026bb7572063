"""The MiniLM adapter and the encoder protocol reproduce the reference figures of assets.md."""

from __future__ import annotations

import pytest
import torch

from numcast.evaluate.text import encoder_metrics
from numcast.models.minilm import embed, load_minilm, minilm_blocks


@pytest.fixture(scope="module")
def minilm():
    return load_minilm()


def test_float_encoder_metrics_match_the_reference(minilm):
    model, tok = minilm
    m = encoder_metrics(lambda t: embed(model, tok, t), lambda t: embed(model, tok, t))
    assert m["wordsim353_spearman"] == pytest.approx(0.729, abs=0.002)  # assets.md: 0.729
    assert m["lee50_pearson"] == pytest.approx(0.656, abs=0.002)  # assets.md: 0.656
    assert m["embedding_cosine"] == pytest.approx(1.0, abs=1e-6)


def test_embeddings_are_normalised_and_semantic(minilm):
    model, tok = minilm
    e = embed(model, tok, ["a cat sits on the mat", "a kitten lies on the rug", "stock markets fell sharply"])
    assert torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
    assert e[0] @ e[1] > 0.4 > e[0] @ e[2]
    assert len(minilm_blocks(model)) == 6
