"""Classifier metrics: labelled top-1 accuracy, and — where no labels ship offline (ImageNet) — top-1
agreement and KL divergence of the quantized model's predictions against the float model's; for any model on
the user's tensors, the cosine of its outputs to the float ones."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from numcast.nn.observe import call_model


@torch.no_grad()
def logits_of(model, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    return torch.cat([model(images[i : i + batch_size]).float() for i in range(0, images.shape[0], batch_size)])


def agreement_and_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement (fraction of inputs with the same arg-max) and mean KL(p_ref ‖ p) in nats."""
    agree = float((ref_logits.argmax(1) == logits.argmax(1)).float().mean())
    kl = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(ref_logits, 1), log_target=True, reduction="batchmean")
    return {"top1_agreement": agree, "kl_divergence": float(kl)}


def top1_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows of ``logits`` ``[N, classes]`` whose arg-max is the label ``[N]``."""
    return float((logits.argmax(1) == labels).float().mean())


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` on ``images`` ``[N, ...]`` with int labels ``[N]``.

    The model runs in eval mode (its previous mode is restored afterwards), in batches of ``batch_size`` on the
    device of its first parameter.
    """
    if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ValueError(f"need as many (>0) images as labels, got {images.shape[0]} and {labels.shape[0]}")
    device = next(iter(model.parameters()), torch.empty(0)).device
    was_training = model.training
    model.eval()
    try:
        correct = 0
        for i in range(0, images.shape[0], batch_size):
            pred = model(images[i : i + batch_size].to(device)).argmax(dim=-1).cpu()
            correct += int((pred == labels[i : i + batch_size]).sum())
    finally:
        model.train(was_training)
    return correct / images.shape[0]


def _first_tensor(out) -> torch.Tensor:
    for attr in ("logits", "last_hidden_state"):
        if hasattr(out, attr):
            return getattr(out, attr)
    return out[0] if isinstance(out, (tuple, list)) else out


def output_cosine(model: nn.Module, inputs: list) -> Callable[[nn.Module], dict[str, float]]:
    """A metric for any model on the user's inputs (tensors or dicts of keyword arguments): the cosine between
    the flattened output (logits, last hidden state, or the output tensor) of a model and the float model's
    (taken now), averaged over samples."""
    ref = _outputs(model, inputs)

    def evaluate(m) -> dict[str, float]:
        got = _outputs(m, inputs)
        pairs = zip(got, ref, strict=True)
        cos = [F.cosine_similarity(g.flatten(1).double(), r.flatten(1).double(), dim=1) for g, r in pairs]
        return {"output_cosine": float(torch.cat(cos).mean())}

    return evaluate


@torch.no_grad()
def _outputs(model: nn.Module, inputs: list) -> list[torch.Tensor]:
    return [_first_tensor(call_model(model, b)).float() for b in inputs]
