"""Metric protocols against independent computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from numcast.evaluate.text import perplexity, wiki_split
from numcast.evaluate.vision import accuracy, agreement_and_kl, top1_accuracy


class Uniform(torch.nn.Module):
    """A 'language model' that predicts a uniform distribution over V tokens: perplexity is exactly V."""

    def __init__(self, v: int) -> None:
        super().__init__()
        self.v = v

    def forward(self, input_ids):
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.v)})()


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    w = torch.randint(0, 50, (5, 33), generator=torch.Generator().manual_seed(0))
    assert math.isclose(perplexity(Uniform(50), w, batch_size=2), 50.0, rel_tol=1e-6)  # float32 log-softmax


def test_agreement_kl_and_accuracy():
    ref = torch.randn(100, 10, generator=torch.Generator().manual_seed(1))
    same = agreement_and_kl(ref, ref.clone())
    assert same["top1_agreement"] == 1.0 and abs(same["kl_divergence"]) < 1e-6
    other = ref + torch.randn(100, 10, generator=torch.Generator().manual_seed(2))
    m = agreement_and_kl(ref, other)
    p, q = F.softmax(ref, 1), F.softmax(other, 1)
    assert math.isclose(m["kl_divergence"], float((p * (p.log() - q.log())).sum(1).mean()), rel_tol=1e-5)
    assert m["top1_agreement"] == float((ref.argmax(1) == other.argmax(1)).float().mean())
    assert top1_accuracy(ref, ref.argmax(1)) == 1.0


def test_wiki_split_is_disjoint_and_covers_the_excerpt():
    cal, ev = wiki_split()
    assert cal and ev and not set(cal) & set(ev)
    assert len(cal) > 3 * len(ev) > 0


def test_accuracy_of_a_constant_predictor_is_the_class_frequency():
    class Const(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bias = nn.Parameter(torch.tensor([0.0, 0.0, 1.0] + [0.0] * 7))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bias.expand(x.shape[0], 10)

    y = torch.tensor([2, 2, 0, 5, 2, 9, 1])
    model = Const().train()
    assert accuracy(model, torch.zeros(7, 1, 28, 28), y, batch_size=3) == pytest.approx(3 / 7)
    assert model.training  # mode restored
