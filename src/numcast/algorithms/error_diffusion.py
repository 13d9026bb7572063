"""Error Diffusion (Khodamoradi, Denolf, Dellinger 2024, arXiv 2410.11203), built on GPFQ (Lybrand & Saab
2021; Zhang, Zhou & Saab 2023), for every numcast weight format. Read with ``../shared/design/papers.md`` §1.

A layer y = W·x with W [out, in]. Calibration inputs as rows: A [m, in] reaches the layer in the float network,
Â [m, in] in the network whose earlier layers are already quantized. Error Diffusion looks for Ŵ on the
format's grid with Â·Ŵᵀ ≈ A·Wᵀ: the quantized layer, fed what the quantized network really gives it, reproduces
the float network's output, so the error arriving from upstream is compensated ("diffused") here instead of
being passed on. No Hessian inverse, no damping, no knob.

GPFQ, one output neuron w, input features t = 1..in in order, running residual u ∈ R^m (u = 0 at first)::

    p_t = <Â_t, u + w_t·A_t> / ||Â_t||²      # the best value for this weight given the residual so far
    q_t = Q(p_t)                             # onto the format's grid
    u  += w_t·A_t − q_t·Â_t

:func:`error_diffusion_direct` is exactly this, vectorised over all output channels (U [m, out]).

Gram form [reconstruction; papers.md "Memory/cost"], used by the pipeline: with G = ÂᵀA and H = ÂᵀÂ
([in, in], accumulated once over any number of tokens), after columns s < t::

    <Â_t, U> = r_t = Σ_{s<t} (G[t, s]·W[:, s] − H[t, s]·Q[:, s]),     p_t = (r_t + G[t, t]·W[:, t]) / H[t, t]

r is kept for every column and updated lazily in batches of columns (as GPTQ's lazy batch updates): cost
O(in²·out) after accumulation, independent of m. Both forms give the same targets within float tolerance.

Q is the numcast cast of the layer's format with scales fixed before a block's first column is rounded
(:class:`numcast.algorithms.columns.ColumnQuantizer`): block scales ``dynamic`` (default; from the block's current
targets p when its first column is reached, i.e. from the residual of all earlier columns — the block's own
columns are not chosen yet) or ``static`` (from the float weights); per-channel and per-tensor scales from the
float weights. Columns are visited in natural order (the documented default, not a knob).

Dead input features (H[t, t] = 0: zero on every calibration row of the quantized path) carry no information
about their weight; they get Q(w_t), the round-to-nearest value [numcast's choice; GPTQ's reference zeroes
them instead — a feature that is dead in calibration need not be dead in use].

With Â = A and orthogonal input features (G = H diagonal), r = 0 and p_t = w_t: Error Diffusion is RTN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from numcast.algorithms.columns import ColumnQuantizer
from numcast.formats.qtensor import QTensor
from numcast.formats.registry import FormatLike, get_format

LAZY_BATCH = 128  # columns per lazy update of the residual (a multiple of every format block up to 128)


@dataclass
class EDResult:
    qtensor: QTensor | None  # None for the float re-fit (fmt=None)
    weight: torch.Tensor  # the quantized weight [out, in] (float32), = qtensor.dequantize()


def _check(weight: torch.Tensor, *stats: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"expected a [out, in] weight, got shape {tuple(weight.shape)}")
    if not all(torch.isfinite(t).all() for t in (weight, *stats)):
        raise ValueError("Error Diffusion needs finite weights and finite calibration statistics")


def error_diffusion(
    weight: torch.Tensor,
    g: torch.Tensor,
    h: torch.Tensor,
    fmt: FormatLike | None,
    *,
    scale_rule: str = "dynamic",
) -> EDResult:
    """Quantize ``weight`` [out, in] to ``fmt`` from the Gram matrices ``g`` = ÂᵀA and ``h`` = ÂᵀÂ.

    ``g``/``h`` are [in, in], or [groups, in, in] for a grouped convolution whose output rows split into
    ``groups`` equal parts, each reading its own inputs (depthwise: one group per channel). Any common positive
    factor of g and h (e.g. 1/m) cancels. ``fmt=None`` is Q = identity: the float weight re-fitted to the
    quantized network's inputs (the paper's calibration of layers kept in high precision; ``qtensor`` None)."""
    _check(weight, g, h)
    if g.dim() == 2:
        g, h = g[None], h[None]
    ng, n_in = g.shape[0], g.shape[-1]
    out = weight.shape[0]
    if g.shape != h.shape or g.shape[1:] != (n_in, n_in) or weight.shape[1] != n_in or out % ng:
        raise ValueError(f"Gram shapes {tuple(g.shape)}/{tuple(h.shape)} do not match weight {tuple(weight.shape)}")
    rpg = out // ng
    w = weight.detach().double().reshape(ng, rpg, n_in)  # [groups, rows per group, in]
    g, h = g.detach().double(), h.detach().double()
    gd, hd = torch.diagonal(g, dim1=1, dim2=2), torch.diagonal(h, dim1=1, dim2=2)  # [groups, in]
    live = hd > 0
    ratio = torch.where(live, gd / torch.where(live, hd, torch.ones_like(hd)), torch.ones_like(hd))
    inv_h = torch.where(live, 1.0 / torch.where(live, hd, torch.ones_like(hd)), torch.zeros_like(hd))

    def targets(r: torch.Tensor, cols: slice) -> torch.Tensor:  # p for columns `cols` given residuals r
        p = r * inv_h[:, None, cols] + w[:, :, cols] * ratio[:, None, cols]
        return torch.where(live[:, None, cols], p, w[:, :, cols])  # dead features: the weight itself

    cq = None if fmt is None else ColumnQuantizer(weight.detach().float(), get_format(fmt), scale_rule=scale_rule)
    fb = (cq.block if cq else None) or 1
    batch = max(fb, LAZY_BATCH // fb * fb)
    r = torch.zeros_like(w)  # r[:, :, t] = <Â_t, U> over the columns chosen so far
    q = torch.zeros_like(w)
    for i1 in range(0, n_in, batch):
        i2 = min(i1 + batch, n_in)
        for t in range(i1, i2):
            if cq is not None and cq.needs_scales(t):
                blk = slice(t, min(t + fb, n_in))
                cq.fix_block(t, targets(r[:, :, blk], blk).reshape(out, -1).float())
            p = targets(r[:, :, t : t + 1], slice(t, t + 1))[:, :, 0]  # [groups, rows]
            q[:, :, t] = p if cq is None else cq.quantize(p.reshape(out), t).double().reshape(ng, rpg)
            if t + 1 < i2:  # residuals of the rest of this batch, now
                nxt = slice(t + 1, i2)
                r[:, :, nxt] += w[:, :, t, None] * g[:, None, nxt, t] - q[:, :, t, None] * h[:, None, nxt, t]
        if i2 < n_in:  # residuals of the later columns, in one product per batch
            cur, rest = slice(i1, i2), slice(i2, n_in)
            r[:, :, rest] += torch.bmm(w[:, :, cur], g[:, rest, cur].transpose(1, 2))
            r[:, :, rest] -= torch.bmm(q[:, :, cur], h[:, rest, cur].transpose(1, 2))
    return EDResult(cq.qtensor() if cq else None, q.reshape(out, n_in).float())


def error_diffusion_direct(
    weight: torch.Tensor, a: torch.Tensor, a_hat: torch.Tensor, fmt: FormatLike, *, scale_rule: str = "dynamic"
) -> EDResult:
    """The same quantization from the inputs themselves, ``a`` (float path) and ``a_hat`` (quantized path), both
    [m, in]: the GPFQ loop over columns with the explicit residual U [m, out] (float64). For tests and small
    layers; the pipeline uses :func:`error_diffusion` (the Gram form)."""
    fmt = get_format(fmt)
    _check(weight, a, a_hat)
    if a.shape != a_hat.shape or a.dim() != 2 or a.shape[1] != weight.shape[1]:
        raise ValueError(f"inputs {tuple(a.shape)}/{tuple(a_hat.shape)} do not match weight {tuple(weight.shape)}")
    w = weight.detach().double()
    a, a_hat = a.detach().double(), a_hat.detach().double()
    out, n_in = w.shape
    norms = a_hat.square().sum(0)  # ||Â_t||²

    def target(u: torch.Tensor, t: int) -> torch.Tensor:  # [out]
        if norms[t] == 0:
            return w[:, t]
        return (a_hat[:, t] @ (u + a[:, t, None] * w[None, :, t])) / norms[t]

    cq = ColumnQuantizer(weight.detach().float(), fmt, scale_rule=scale_rule)
    u = torch.zeros(a.shape[0], out, dtype=torch.float64)
    q = torch.zeros_like(w)
    for t in range(n_in):
        if cq.needs_scales(t):
            cols = range(t, min(t + cq.block, n_in))
            cq.fix_block(t, torch.stack([target(u, c) for c in cols], dim=1).float())
        q[:, t] = cq.quantize(target(u, t), t).double()
        u += a[:, t, None] * w[None, :, t] - a_hat[:, t, None] * q[None, :, t]
    return EDResult(cq.qtensor(), q.float())
