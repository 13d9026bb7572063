"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers"), for every numcast weight format.

Read next to the paper's Algorithm 1. The layer's output error ||WX − ŴX||² is a quadratic in W with Hessian
H = 2XXᵀ (X: layer inputs [in, tokens]). Columns are quantized in order; after column i is rounded, the
remaining columns absorb its error through the inverse Hessian (Optimal Brain Surgeon update)::

    err = (w_i − q_i) / [H⁻¹]_ii ;   W[:, i:] −= err · [H⁻¹]_{i, i:}

The upper Cholesky factor of H⁻¹ replaces H⁻¹ (the paper's numerically stable form, §"Cholesky
reformulation"); ``damp`` adds damp·mean(diag H) to the diagonal; updates are applied lazily in batches of
``block_size`` columns (§"Lazy batch-updates"); ``act_order`` visits columns by decreasing diag(H)
(the reference's "act-order"). Dead inputs (diag H = 0) get weight 0.

Block-scaled formats (MX, NVFP4, BFP, grouped int): a block's shared scale is fixed when the block's first
column is reached, from the block's current (already updated) columns — as the reference does for
groups — and the lazy batch is a multiple of the format block so the whole block is up to date then.
With ``act_order`` the columns of a block are no longer visited together, so block scales are computed
from the float weights before the pass (the reference's "static groups"). Per-channel and per-tensor
scales always come from the float weights. Everything else is the format's own cast (numcast ``grid_cast``),
so the result is an exact member of the format.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from numcast.algorithms.columns import ColumnQuantizer
from numcast.formats.qtensor import QTensor
from numcast.formats.registry import FormatLike, get_format


@dataclass
class GPTQResult:
    qtensor: QTensor
    weight: torch.Tensor  # the quantized weight [out, in] (float32), = qtensor.dequantize()
    proxy_loss: float  # Σ_i (w_i − q_i)² / [H⁻¹]_ii / 2, the paper's running loss


def hessian(x: torch.Tensor) -> torch.Tensor:
    """H = 2/n · XᵀX for layer inputs x [..., in] (float64 accumulation); the GPTQ reference's scaling."""
    x2 = x.detach().reshape(-1, x.shape[-1]).double()
    return 2.0 * (x2.T @ x2) / max(x2.shape[0], 1)


def gptq(
    weight: torch.Tensor,
    h: torch.Tensor,
    fmt: FormatLike,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> GPTQResult:
    """Quantize ``weight`` [out, in] to ``fmt`` given the Hessian ``h`` (see :func:`hessian`).

    ``h`` is [in, in], or [groups, in, in] for a grouped convolution whose output rows split into ``groups``
    equal parts, each seeing its own inputs (depthwise: one group per channel); every group then gets its own
    inverse Hessian, with one shared column order."""
    fmt = get_format(fmt)
    w = weight.detach().double().clone()
    out_f, in_f = w.shape
    h = h.detach().double().clone()
    if h.dim() == 2:
        h = h[None]
    g = h.shape[0]
    if h.shape[1:] != (in_f, in_f) or out_f % g:
        raise ValueError(f"Hessian shape {tuple(h.shape)} does not match weight {tuple(w.shape)}")
    if not torch.isfinite(w).all() or not torch.isfinite(h).all():
        raise ValueError("GPTQ needs finite weights and a finite Hessian")
    row_group = torch.arange(out_f) // (out_f // g)
    diag = torch.diagonal(h, dim1=1, dim2=2)  # [g, in]
    dead = diag == 0
    idx = torch.arange(in_f)
    h[:, idx, idx] = torch.where(dead, torch.ones_like(diag), diag)
    w[dead[row_group]] = 0.0
    fmt_block = fmt.scaling.block_size if fmt.scaling.granularity == "block" else None
    perm = torch.argsort(diag.sum(0), descending=True) if act_order else idx
    # the quantizer works in original column order; GPTQ visits columns in `perm` order
    cq = ColumnQuantizer(w.float(), fmt, scale_rule="static" if act_order else "dynamic")
    if act_order:  # (the identity order needs no permuted copies: [in, in] float64 each)
        w = w[:, perm]
        h = h[:, perm][:, :, perm]
    mean_diag = torch.diagonal(h, dim1=1, dim2=2).mean(1)
    torch.diagonal(h, dim1=1, dim2=2).add_((damp * mean_diag)[:, None])
    # H⁻¹'s upper Cholesky factor [g, in, in], at most two such float64 matrices alive at a time (down
    # projections of LLMs: in = 2816 … 28672)
    hinv = torch.linalg.cholesky(h)
    del h
    hinv = torch.cholesky_inverse(hinv)
    hinv = torch.linalg.cholesky(hinv, upper=True)
    if fmt_block and not act_order:
        block_size = max(fmt_block, block_size // fmt_block * fmt_block)
    q = torch.zeros_like(w)
    loss = 0.0
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            if cq.needs_scales(col):  # dynamic rule: fix the block's scale from its updated columns
                cq.fix_block(col, w1[:, i : i + fmt_block].float())
            qi = cq.quantize(w1[:, i], col).double()
            d = hinv1[row_group, i, i]
            q[:, i1 + i] = qi
            e = (w1[:, i] - qi) / d
            loss += float((e**2).sum()) / 2
            w1[:, i:] -= e[:, None] * hinv1[row_group, i, i:]
            err1[:, i] = e
        if i2 < in_f:
            upd = torch.bmm(err1.reshape(g, -1, i2 - i1), hinv[:, i1:i2, i2:])  # [g, rows/g, rest]
            w[:, i2:] -= upd.reshape(out_f, -1)
    inv = torch.argsort(perm)
    return GPTQResult(cq.qtensor(), q[:, inv].float(), loss)
