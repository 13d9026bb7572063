"""Padding tokens out of the calibration statistics.

A batch of texts of different lengths is padded to its longest (Hugging Face tokenizers, ``padding=True``); the
padding positions still run through every layer, but the model's ``attention_mask`` hides them from the real
tokens and from whatever uses the outputs (mean pooling, the loss). Their rows are not part of the function
being quantized, so a weight solver that fits them fits noise: in all-MiniLM-L6-v2's calibration (128 chunks of
48 words, batches of 16) 24 % of the rows are padding.

:func:`token_mask` reads a calibration batch's mask ([batch, tokens], None when the batch has none or pads
nothing); :func:`real_tokens` keeps the rows of a layer's input or output whose leading dims are that mask's
shape (a Linear's ``[batch, tokens, features]``). A tensor of any other shape (a convolution's maps, a
mixture-of-experts expert's routed tokens) passes whole: padding there is not recognised.

The runner (:class:`numcast.pipeline.runner.Streams`) applies them to the layer-wise solvers' statistics, the
layers' SQNR and the RTN guard's measure, and hands them to block solvers (Attention Round's block loss, whose
mini-batches draw each sample's mask with it); :func:`observing_real_tokens` applies them to static activation
calibration; the mixed-precision measurement (:func:`numcast.pipeline.mixed_precision.measure_layers`) to its
sums.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from numcast.nn.act_quant import ActQuantizer


def token_mask(batch: object) -> torch.Tensor | None:
    """The real-token mask ([batch, tokens], bool) of a calibration batch given as keyword arguments with a 2-D
    ``attention_mask``; None when the batch has no such mask or every position is a real token."""
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    real = mask != 0
    if not real.any(dim=1).all():
        raise ValueError("a calibration sample has no real token (its attention_mask is all zeros)")
    return None if real.all() else real


def mask_for(x: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor | None:
    """``mask`` where it applies to ``x`` (``x`` is [batch, tokens, ...] with the mask's leading shape), else None."""
    if x is None or mask is None or x.dim() < 3 or x.shape[:2] != mask.shape:
        return None
    return mask


def real_tokens(x: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor | None:
    """``x`` [batch, tokens, ...] → its real tokens' rows [n_real, ...] (in batch order) where ``mask`` applies
    (:func:`mask_for`); otherwise ``x`` itself."""
    mask = mask_for(x, mask)
    return x if mask is None else x[mask.to(x.device)]


@contextmanager
def observing_real_tokens(quants: list[ActQuantizer], mask: torch.Tensor | None) -> Iterator[None]:
    """While one batch runs: the static activation quantizers ``quants`` observe only its real tokens."""
    for q in quants:
        q.observed_rows = None if mask is None else (lambda x: real_tokens(x, mask))
    try:
        yield
    finally:
        for q in quants:
            q.observed_rows = None
