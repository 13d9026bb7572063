"""Classifier metrics: labelled top-1 accuracy, and — where no labels ship offline (ImageNet) — top-1
agreement and KL divergence of the quantized model's predictions against the float model's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
