"""Error Diffusion (Khodamoradi, Denolf, Dellinger 2024, arXiv 2410.11203), built on GPFQ (Lybrand & Saab
2021; Zhang, Zhou & Saab 2023), for every numcast weight format. Read with ``../shared/design/papers.md`` §1.

A layer y = W·x with W [out, in]. Calibration inputs as rows: A [m, in] reaches the layer in the float network,
Â [m, in] in the network whose earlier layers are already quantized. Error Diffusion looks for Ŵ on the
format's grid with Â·Ŵᵀ ≈ A·Wᵀ: the quantized layer, fed what the quantized network really gives it, reproduces
the float network's output, so the error arriving from upstream is compensated ("diffused") here instead of
being passed on. No Hessian inverse and no knob to tune (the pipeline adds GPTQ's fixed damping constant as a
ridge: "Damping" below).

GPFQ, one output neuron w, input features t visited one by one, running residual u ∈ R^m (u = 0 at first)::

    p_t = <Â_t, u + w_t·A_t> / ||Â_t||²      # the best value for this weight given the residual so far
    q_t = Q(p_t)                             # onto the format's grid
    u  += w_t·A_t − q_t·Â_t

:func:`error_diffusion_direct` is exactly this, vectorised over all output channels (U [m, out]).

Gram form [reconstruction; papers.md "Memory/cost"], used by the pipeline: with G = ÂᵀA and H = ÂᵀÂ
([in, in], accumulated once over any number of tokens), after columns s < t::

    <Â_t, U> = r_t = Σ_{s<t} (G[t, s]·W[:, s] − H[t, s]·Q[:, s]),     p_t = (r_t + G[t, t]·W[:, t]) / H[t, t]

r is kept for every column and updated lazily in batches of columns (as GPTQ's lazy batch updates); inside a
batch a column's residual is completed when it is reached, from the batch's earlier columns (one matrix-vector
product per column instead of updating every later column of the batch): cost O(in²·out) after accumulation,
independent of m. Both forms give the same targets within float tolerance.

Q is the numcast cast of the layer's format with scales fixed before a block's first column is rounded
(:class:`numcast.algorithms.columns.ColumnQuantizer`): block scales ``static`` (default; from the float weights
before the pass) or ``dynamic`` (from the block's current targets p when its first column is reached, i.e.
from the residual of all earlier columns — the block's own columns are not chosen yet); per-channel and
per-tensor scales from the float weights.

Column order [numcast's choice, measured with benchmarks/ptq.py]: GPFQ as published visits the inputs in
their natural order, but the greedy result depends strongly on the order and no order wins everywhere. The
default ``strong-first`` visits the strongest inputs (largest ||Â_t||²) first, so the many weaker columns
after them absorb their rounding error (the idea of GPTQ's act-order): SmolLM2-135M at MXFP4 perplexity 26.3
(weak-first 30.6, natural 30.9), MobileNetV2 MXFP4 top-1 agreement 0.82 (weak-first 0.78). MiniLM, a
post-LayerNorm BERT with a few outlier features, is the exception: embedding cosine to float 0.79
strong-first, 0.97 ``weak-first`` (numbers in README, measured while padding tokens were in the statistics).
``order="auto"`` runs both and keeps, per layer, the one with the lower objective ||ÂŴᵀ − AWᵀ||² =
Σ_rows (ŵᵀHŵ − 2ŵᵀGw) + const (twice the solve's cost); on MiniLM it picks strong-first too (cosine 0.788,
README limits) — the calibration objective does not see what
MiniLM's single-word evaluation inputs need. Orders by norm visit a block's columns apart, so block scales
are ``static`` by default; with the ``dynamic`` rule blocks are kept whole (ordered by their summed norms,
columns inside a block too).

The pipeline adds a safeguard around this solve (``rtn_guard``, :class:`numcast.pipeline.runner.RTNGuard`): the
RTN model runs beside the solved one on every 8th calibration batch, and when its output ends closer to the
float model's, every solved layer takes its RTN weights. The layer objective is blind to what follows the
layer: on MiniLM, where Error Diffusion loses to RTN, the loss is in the attention-output and FFN layers
(``benchmarks/ed_minilm.py``: with RTN there and Error Diffusion on q/k/v, embedding cosine 0.964 vs RTN's
0.963), although Error Diffusion lowers their objective on held-out calibration rows too, and each group's
solution even brings its block's output closer to the float block's.

Damping (``damp``; this function's default 0 is GPFQ as published, the pipeline's recipe default is 0.01) adds
λ = damp · mean(diag H) to the diagonals of both H and G, as if every input feature had one more calibration row
of its own, of value √λ in both streams. The objective becomes ||ÂŴᵀ − AWᵀ||²/m + λ·||Ŵ − W||²: a ridge toward
the float weight (added to H alone it would pull toward 0), with GPTQ's damping λ [numcast's addition; the
paper has none]. Why: Error Diffusion fits its few calibration rows far more closely than it generalises (README,
Qwen2.5-Coder: its KL to float on the guard's calibration windows 4–5× below the evaluation tokens'), and the
ridge keeps a solve from moving weights along directions the calibration rows barely measure. The constant is
GPTQ's, not tuned per model; ``benchmarks/ptq.py`` ablation ``error-diffusion-nodamp`` (damp 0) measures it in
the README's PTQ section.

Dead input features (H[t, t] = 0: zero on every calibration row of the quantized path) carry no information
about their weight; they get Q(w_t), the round-to-nearest value [numcast's choice; GPTQ's reference zeroes
them instead — a feature that is dead in calibration need not be dead in use].

With Â = A and orthogonal input features (G = H diagonal), r = 0 and p_t = w_t: Error Diffusion is RTN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from numcast.algorithms.columns import ColumnQuantizer
from numcast.formats.qtensor import QTensor
from numcast.formats.registry import FormatLike, get_format

LAZY_BATCH = 128  # about this many columns (whole blocks) per lazy update of the residual
REST_SLAB = 512  # later columns per product of that update (its temporary: [out, 512] float64, not [out, in])
ORDERS = ("auto", "strong-first", "weak-first", "natural")


@dataclass
class EDResult:
    qtensor: QTensor | None  # None for the float re-fit (fmt=None)
    weight: torch.Tensor  # the quantized weight [out, in] (float32), = qtensor.dequantize()
    order: str = "natural"  # the column order used (the one "auto" chose)


def _check(weight: torch.Tensor, *stats: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"expected a [out, in] weight, got shape {tuple(weight.shape)}")
    if not all(torch.isfinite(t).all() for t in (weight, *stats)):
        raise ValueError("Error Diffusion needs finite weights and finite calibration statistics")


def visiting_order(h: torch.Tensor, order: str, whole_blocks: int | None = None) -> torch.Tensor:
    """The order in which the input columns are visited (a permutation of range(in)), from H = ÂᵀÂ ([in, in]
    or [groups, in, in]): ``strong-first`` / ``weak-first`` by decreasing / increasing ||Â_t||² = H[t, t]
    (summed over groups), or ``natural``. ``whole_blocks`` = B keeps blocks of B columns together (blocks by
    their summed norms, then columns inside each block). Ties keep the natural order (stable sort)."""
    if order not in ORDERS[1:]:
        raise ValueError(f"unknown column order {order!r}; one of {ORDERS}")
    hd = torch.diagonal(h if h.dim() == 3 else h[None], dim1=1, dim2=2).sum(0)  # [in]
    n = hd.shape[0]
    if order == "natural":
        return torch.arange(n)
    desc = order == "strong-first"
    fb = whole_blocks or 1
    starts = list(range(0, n, fb))
    sums = torch.stack([hd[b : b + fb].sum() for b in starts])
    perm = [
        starts[bi] + torch.sort(hd[starts[bi] : starts[bi] + fb], descending=desc, stable=True).indices
        for bi in torch.sort(sums, descending=desc, stable=True).indices.tolist()
    ]
    return torch.cat(perm)


def permute_in_place(m: torch.Tensor, perm: torch.Tensor, rows_per_step: int = 256) -> torch.Tensor:
    """``m`` [groups, n, n] becomes ``m[:, perm[:, None], perm]`` in its own memory (returned): columns one slab
    of ``rows_per_step`` rows at a time (a temporary of that slab), then rows by following the cycles of
    ``perm`` (one row's temporary per cycle). Copies only, so bit for bit the gather's result, without the
    gather's second [groups, n, n] matrix (60 MiB for a 2816-wide float64 Gram matrix)."""
    n = m.shape[-1]
    for r0 in range(0, n, rows_per_step):
        slab = m[:, r0 : r0 + rows_per_step]
        slab.copy_(slab[:, :, perm])
    order, seen = perm.tolist(), [False] * n
    for start in range(n):
        if seen[start] or order[start] == start:
            continue
        held, k = m[:, start].clone(), start  # new row k = old row order[k], along the cycle through start
        while order[k] != start:
            m[:, k].copy_(m[:, order[k]])
            seen[k], k = True, order[k]
        m[:, k].copy_(held)
        seen[k] = True
    return m


def _batches(perm: torch.Tensor, block: int | None) -> list[tuple[int, int]]:
    """Lazy-update batches over visiting positions: about LAZY_BATCH columns, never splitting a block that is
    visited whole."""
    fb = block or 1
    ends, count = [], 0
    for pos in range(perm.shape[0]):
        count += 1
        last = pos + 1 == perm.shape[0]
        if last or (count >= LAZY_BATCH and int(perm[pos + 1]) // fb != int(perm[pos]) // fb):
            ends.append(pos + 1)
            count = 0
    return list(zip([0] + ends[:-1], ends, strict=True))


def _orders_and_whole_block(fmt: FormatLike | None, scale_rule: str, order: str) -> tuple[list[str], int | None]:
    """(orders to try, whole-block size for the dynamic rule)."""
    if order not in ORDERS:
        raise ValueError(f"unknown column order {order!r}; one of {ORDERS}")
    f = None if fmt is None else get_format(fmt)
    blocked = f is not None and f.scaling.granularity == "block"
    whole = f.scaling.block_size if blocked and scale_rule == "dynamic" else None
    return (["strong-first", "weak-first"] if order == "auto" else [order]), whole


def error_diffusion(
    weight: torch.Tensor,
    g: torch.Tensor,
    h: torch.Tensor,
    fmt: FormatLike | None,
    *,
    scale_rule: str = "static",
    order: str = "strong-first",
    damp: float = 0.0,
    overwrite_gram: bool = False,
) -> EDResult:
    """Quantize ``weight`` [out, in] to ``fmt`` from the Gram matrices ``g`` = ÂᵀA and ``h`` = ÂᵀÂ.

    ``g``/``h`` are [in, in], or [groups, in, in] for a grouped convolution whose output rows split into
    ``groups`` equal parts, each reading its own inputs (depthwise: one group per channel; the groups share one
    column order, from their summed norms). Any common positive
    factor of g and h (e.g. 1/m) cancels. ``order``: the column order (module docstring; ``auto`` keeps the
    better of strong-first and weak-first by the objective; the one used is ``EDResult.order``).
    ``fmt=None`` is Q = identity: the float weight re-fitted to the quantized network's inputs (the paper's
    calibration of layers kept in high precision; ``qtensor`` None). ``damp`` ≥ 0: λ = damp · mean(diag h) (per
    group) added to the diagonals of ``g`` and ``h`` (module docstring). ``overwrite_gram``: ``g`` and ``h`` are the
    caller's to lose; with one column order and contiguous float64 matrices they are permuted in place
    (:func:`permute_in_place`: two float64 [in, in] matrices alive instead of three) and their storage is
    released at the end (reading them afterwards raises instead of giving permuted values)."""
    _check(weight, g, h)
    if g.dim() == 2:
        g, h = g[None], h[None]
    ng, n_in = g.shape[0], g.shape[-1]
    out = weight.shape[0]
    if g.shape != h.shape or g.shape[1:] != (n_in, n_in) or weight.shape[1] != n_in or out % ng:
        raise ValueError(f"Gram shapes {tuple(g.shape)}/{tuple(h.shape)} do not match weight {tuple(weight.shape)}")
    orders, whole = _orders_and_whole_block(fmt, scale_rule, order)
    if not (math.isfinite(damp) and damp >= 0):
        raise ValueError(f"damp must be a finite number >= 0, got {damp}")
    g, h = g.detach().double(), h.detach().double()
    in_place = overwrite_gram and len(orders) == 1 and g.is_contiguous() and h.is_contiguous()
    if damp:
        g, h = (g, h) if in_place else (g.clone(), h.clone())  # the caller's matrices are left alone
        lam = damp * torch.diagonal(h, dim1=1, dim2=2).mean(1, keepdim=True)  # [groups, 1]
        torch.diagonal(h, dim1=1, dim2=2).add_(lam)
        torch.diagonal(g, dim1=1, dim2=2).add_(lam)
    best, best_loss = None, None
    for o in orders:
        res = _diffuse(weight, ng, g, h, fmt, scale_rule, visiting_order(h, o, whole), o, in_place)
        if len(orders) == 1:
            return res
        loss = layer_objective(res.weight, weight, g, h)
        if best_loss is None or loss < best_loss:
            best, best_loss = res, loss
    return best


def layer_objective(q: torch.Tensor, weight: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> float:
    """Error Diffusion's objective of a candidate ``q`` [out, in] for ``weight`` [out, in], up to a constant:
    ||ÂŴᵀ − AWᵀ||² / m − ||AWᵀ||² / m = Σ_rows (ŵᵀHŵ − 2ŵᵀGw), from G = ÂᵀA/m and H = ÂᵀÂ/m ([in, in] or
    [groups, in, in], rows of ``q`` split evenly over the groups). Lower is better; float64."""
    if g.dim() == 2:
        g, h = g[None], h[None]
    shape = (g.shape[0], q.shape[0] // g.shape[0], q.shape[1])
    qd, w = q.detach().double().reshape(shape), weight.detach().double().reshape(shape)
    g, h = g.double(), h.double()
    return float((torch.bmm(qd, h) * qd).sum() - 2 * (torch.bmm(qd, g) * w).sum())


def _diffuse(weight, ng, g, h, fmt, scale_rule, perm, order_name, in_place: bool = False) -> EDResult:
    """The Gram-form pass over the columns in ``perm`` (see module docstring) for ``weight`` [out, in] whose rows
    split into ``ng`` groups; ``in_place``: ``g`` and ``h`` are permuted in their own memory."""
    out, n_in = weight.shape
    rpg = out // ng
    cq = None if fmt is None else ColumnQuantizer(weight.detach().float(), get_format(fmt), scale_rule=scale_rule)
    fb = cq.block if cq else None
    # below, everything is in visiting order: position k holds input column perm[k]; the weight and the chosen
    # values are held in their own dtypes (exact) and taken to float64 one batch of columns at a time
    w = weight.detach().reshape(ng, rpg, n_in)[:, :, perm]  # [groups, rows per group, in]
    if in_place:
        g, h = permute_in_place(g, perm), permute_in_place(h, perm)
    else:
        g, h = g[:, perm[:, None], perm], h[:, perm[:, None], perm]  # one gather each
    gd, hd = torch.diagonal(g, dim1=1, dim2=2), torch.diagonal(h, dim1=1, dim2=2)  # [groups, in]
    live = hd > 0
    ratio = torch.where(live, gd / torch.where(live, hd, torch.ones_like(hd)), torch.ones_like(hd))
    inv_h = torch.where(live, 1.0 / torch.where(live, hd, torch.ones_like(hd)), torch.zeros_like(hd))

    def targets(r: torch.Tensor, cols: slice) -> torch.Tensor:  # p at positions `cols` given residuals r
        wc = w[:, :, cols].double()
        p = r * inv_h[:, None, cols] + wc * ratio[:, None, cols]
        return torch.where(live[:, None, cols], p, wc)  # dead features: the weight itself

    r = torch.zeros(w.shape, dtype=torch.float64)  # r[:, :, k] = <Â_perm[k], U> over the batches before k's
    q = torch.zeros(w.shape, dtype=torch.float64 if cq is None else torch.float32)  # cast values: float32 exact
    for i1, i2 in _batches(perm, fb):
        cur = slice(i1, i2)
        w_cur = w[:, :, cur].double()  # [groups, rows per group, batch]
        q_cur = torch.zeros_like(w_cur)  # the batch's chosen values
        # inside a batch, residuals are completed when needed ("left-looking"): the weights' part at once (a
        # strictly lower triangle: column s < k of the batch reaches k), the chosen values' part per column
        r_w = torch.bmm(w_cur, torch.tril(g[:, cur, cur], -1).transpose(1, 2))

        def residual(cols: slice, k: int, i1: int = i1, r_w=r_w, w_cur=w_cur, q_cur=q_cur) -> torch.Tensor:
            # r at positions `cols`, the batch's columns i1..k−1 included
            if k == i1:
                return r[:, :, cols]
            done, d = slice(i1, k), k - i1
            q_part = torch.bmm(q_cur[:, :, :d], h[:, cols, done].transpose(1, 2))
            if cols.stop == k + 1:  # the column itself: its weights' part is the lower triangle's
                return r[:, :, cols] + r_w[:, :, d : d + 1] - q_part
            return r[:, :, cols] + torch.bmm(w_cur[:, :, :d], g[:, cols, done].transpose(1, 2)) - q_part

        for k in range(i1, i2):
            col = int(perm[k])
            if cq is not None and fb and cq.needs_scales(col // fb * fb):  # dynamic: the block's first column
                blk = slice(k, k + min(fb, n_in - col // fb * fb))  # its positions (whole), back to column order
                cq.fix_block(col // fb * fb, targets(residual(blk, k), blk)[:, :, torch.argsort(perm[blk])]
                             .reshape(out, -1).float())  # fmt: skip
            p = targets(residual(slice(k, k + 1), k), slice(k, k + 1))[:, :, 0]  # [groups, rows]
            q_cur[:, :, k - i1] = p if cq is None else cq.quantize(p.reshape(out), col).double().reshape(ng, rpg)
        q[:, :, cur] = q_cur
        for c1 in range(i2, n_in, REST_SLAB):  # residuals of the later columns: one product per batch and slab
            rest = slice(c1, min(c1 + REST_SLAB, n_in))
            r[:, :, rest] += torch.bmm(w_cur, g[:, rest, cur].transpose(1, 2))
            r[:, :, rest] -= torch.bmm(q_cur, h[:, rest, cur].transpose(1, 2))
    r = w = w_cur = q_cur = r_w = residual = None  # before the result's copies
    if in_place:  # the caller's to lose (permuted already): their memory goes before the encoding's temporaries
        g.untyped_storage().resize_(0)
        h.untyped_storage().resize_(0)
    q = q[:, :, torch.argsort(perm)].reshape(out, n_in).float()
    return EDResult(cq.qtensor() if cq else None, q, order_name)


def error_diffusion_direct(
    weight: torch.Tensor,
    a: torch.Tensor,
    a_hat: torch.Tensor,
    fmt: FormatLike,
    *,
    scale_rule: str = "static",
    order: str = "strong-first",
) -> EDResult:
    """The same quantization from the inputs themselves, ``a`` (float path) and ``a_hat`` (quantized path), both
    [m, in]: the GPFQ loop over columns with the explicit residual U [m, out] (float64); ``auto`` keeps the
    order whose final ||U||² is lower. For tests and small layers; the pipeline uses :func:`error_diffusion`."""
    fmt = get_format(fmt)
    _check(weight, a, a_hat)
    if a.shape != a_hat.shape or a.dim() != 2 or a.shape[1] != weight.shape[1]:
        raise ValueError(f"inputs {tuple(a.shape)}/{tuple(a_hat.shape)} do not match weight {tuple(weight.shape)}")
    orders, whole = _orders_and_whole_block(fmt, scale_rule, order)
    w = weight.detach().double()
    a, a_hat = a.detach().double(), a_hat.detach().double()
    out, n_in = w.shape
    norms = a_hat.square().sum(0)  # ||Â_t||²

    def target(u: torch.Tensor, t: int) -> torch.Tensor:  # [out]
        if norms[t] == 0:
            return w[:, t]
        return (a_hat[:, t] @ (u + a[:, t, None] * w[None, :, t])) / norms[t]

    best, best_loss = None, None
    for o in orders:
        cq = ColumnQuantizer(weight.detach().float(), fmt, scale_rule=scale_rule)
        u = torch.zeros(a.shape[0], out, dtype=torch.float64)
        q = torch.zeros_like(w)
        for t in visiting_order(torch.diag(norms), o, whole).tolist():
            if cq.block and cq.needs_scales(t // cq.block * cq.block):
                j0 = t // cq.block * cq.block
                cols = range(j0, min(j0 + cq.block, n_in))
                cq.fix_block(j0, torch.stack([target(u, c) for c in cols], dim=1).float())
            q[:, t] = cq.quantize(target(u, t), t).double()
            u += a[:, t, None] * w[None, :, t] - a_hat[:, t, None] * q[None, :, t]
        loss = float(u.square().sum())
        if best_loss is None or loss < best_loss:
            best, best_loss = EDResult(cq.qtensor(), q.float(), o), loss
    return best
