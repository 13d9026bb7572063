"""Metric protocols against independent computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from numcast.evaluate.text import lm_fidelity, perplexity, wiki_split
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


class Fixed(torch.nn.Module):
    """A 'language model' returning given logits [n, T, V] for window i (its first token)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, input_ids):
        return type("Out", (), {"logits": self.logits[input_ids[:, 0]]})()


def _full_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean over positions of KL(P ‖ Q) over the whole vocabulary, float64 (the independent reference)."""
    logp, logq = F.log_softmax(p_logits.double(), -1), F.log_softmax(q_logits.double(), -1)
    return float((logp.exp() * (logp - logq)).sum(-1).mean())


def test_lm_fidelity_kl_is_exact_over_the_whole_vocabulary_and_a_lower_bound_below_it():
    """KL of the next-token distributions against a full-vocabulary float64 computation: equal when the reference
    keeps every token, a lower bound (and within the tail's share) when it keeps the k most likely; the reference
    against itself: KL 0, agreement 1; perplexity as ``perplexity``; agreement by argmax."""
    g = torch.Generator().manual_seed(0)
    n, t, v = 3, 17, 40
    windows = torch.randint(0, v, (n, t), generator=g)
    windows[:, 0] = torch.arange(n)  # window i's first token says which logits to return
    ref_logits, noise = torch.randn(n, t, v, generator=g) * 3, torch.randn(n, t, v, generator=g)
    ref_model, other = Fixed(ref_logits), Fixed(ref_logits + noise)
    want = _full_kl(ref_logits[:, :-1], (ref_logits + noise)[:, :-1])
    agree = float((ref_logits[:, :-1].argmax(-1) == (ref_logits + noise)[:, :-1].argmax(-1)).double().mean())
    self_metrics, full = lm_fidelity(ref_model, windows, k=v)
    assert self_metrics["kl_divergence"] == 0.0 and self_metrics["top1_agreement"] == 1.0
    assert math.isclose(self_metrics["perplexity"], perplexity(ref_model, windows), rel_tol=1e-12)
    got, _ = lm_fidelity(other, windows, full)
    assert math.isclose(got["kl_divergence"], want, rel_tol=1e-5) and got["top1_agreement"] == agree
    assert math.isclose(got["perplexity"], perplexity(other, windows), rel_tol=1e-12)
    bounds = [lm_fidelity(other, windows, lm_fidelity(ref_model, windows, k=k)[1])[0]["kl_divergence"]
              for k in (1, 5, 20)]  # fmt: skip
    # nested partitions (the top 1 within the top 5 within the top 20): merging fewer outcomes loses less
    assert 0.0 <= bounds[0] <= bounds[1] <= bounds[2] < want


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
