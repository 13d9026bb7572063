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
    overwrite_h: bool = False,
) -> GPTQResult:
    """Quantize ``weight`` [out, in] to ``fmt`` given the Hessian ``h`` (see :func:`hessian`).

    ``h`` is [in, in], or [groups, in, in] for a grouped convolution whose output rows split into ``groups``
    equal parts, each seeing its own inputs (depthwise: one group per channel); every group then gets its own
    inverse Hessian, with one shared column order.

    The damping and the three factorisations run in place in one float64 [groups, in, in] buffer in LAPACK's
    column-major layout (a down projection of a 70B model: in = 28672, 6.1 GiB each). ``overwrite_h``: ``h`` is
    the caller's to lose, and when it is already float64 and column-major (``h.mT.is_contiguous()``, e.g.
    :meth:`numcast.pipeline.layer_stats.HessianStatistics.result` with ``column_major=True``) it is that
    buffer; otherwise ``h`` is copied and left unchanged."""
    fmt = get_format(fmt)
    w = weight.detach().to(torch.float64, copy=True)
    out_f, in_f = w.shape
    h = h.detach()
    if h.dim() == 2:
        h = h[None]
    if not (overwrite_h and h.dtype == torch.float64 and h.mT.is_contiguous()):
        # the matrix's own values (not its transpose: a Gram product is symmetric only up to rounding)
        h = h.mT.to(torch.float64, memory_format=torch.contiguous_format, copy=True).mT
    g = h.shape[0]
    if h.shape[1:] != (in_f, in_f) or out_f % g:
        raise ValueError(f"Hessian shape {tuple(h.shape)} does not match weight {tuple(w.shape)}")
    if not torch.isfinite(w).all() or not torch.isfinite(h).all():
        raise ValueError("GPTQ needs finite weights and a finite Hessian")
    row_group = torch.arange(out_f) // (out_f // g)
    h_rows = row_group if g > 1 else slice(0, 1)  # each weight row's group in H⁻¹ (one group: broadcast)
    diag = torch.diagonal(h, dim1=1, dim2=2)  # [g, in]
    dead = diag == 0
    idx = torch.arange(in_f)
    h[:, idx, idx] = torch.where(dead, torch.ones_like(diag), diag)
    w[dead[row_group]] = 0.0
    fmt_block = fmt.scaling.block_size if fmt.scaling.granularity == "block" else None
    perm = torch.argsort(diag.sum(0), descending=True) if act_order else idx
    # the quantizer works in original column order; GPTQ visits columns in `perm` order
    cq = ColumnQuantizer(w.float(), fmt, scale_rule="static" if act_order else "dynamic")
    if act_order:  # P H P, column-major (the identity order needs no permuted copy)
        w = w[:, perm]
        h = h.mT[:, perm][:, :, perm].mT
    mean_diag = torch.diagonal(h, dim1=1, dim2=2).mean(1)
    torch.diagonal(h, dim1=1, dim2=2).add_((damp * mean_diag)[:, None])
    # H⁻¹'s upper Cholesky factor, in place: L = chol(H), H⁻¹ = (L Lᵀ)⁻¹, U = chol(H⁻¹, upper)
    hinv = torch.linalg.cholesky(h, out=h)
    hinv = torch.cholesky_inverse(hinv, out=hinv)
    hinv = torch.linalg.cholesky(hinv, upper=True, out=hinv)
    if fmt_block and not act_order:
        block_size = max(fmt_block, block_size // fmt_block * fmt_block)
    q = torch.zeros(w.shape, dtype=torch.float32)  # grid values: exact in float32
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
            d = hinv1[h_rows, i, i]
            q[:, i1 + i] = qi
            e = (w1[:, i] - qi) / d
            loss += float((e**2).sum()) / 2
            w1[:, i:] -= e[:, None] * hinv1[h_rows, i, i:]
            err1[:, i] = e
        if i2 < in_f:
            upd = torch.bmm(err1.reshape(g, -1, i2 - i1), hinv[:, i1:i2, i2:])  # [g, rows/g, rest]
            w[:, i2:] -= upd.reshape(out_f, -1)
    if act_order:
        q = q[:, torch.argsort(perm)]
    return GPTQResult(cq.qtensor(), q.float(), loss)
