"""Shared scales: from each row's (block's, channel's, tensor's) range to a scale in the scale format.

All scale arithmetic runs in float64 on the small per-row vectors, so each scale is the scale format's
correctly rounded value of the exact real quotient (float64 then a ≤24-bit format never double-rounds).

Rules (``Scaling.rule``; numcast's choices against peers are stated here once):

- ``floor`` (OCP MX v1.0 §6.3, default for MX): X = 2^(floor(log2 amax) − emax_elem), exponent read
  with frexp-exact bit arithmetic, clamped to E8M0's 2^−127…2^127. May saturate the block max (pitfall 9:
  957 in an E4M3 block becomes 896); spec-conformant.
- ``ceil`` (NVIDIA "RCEIL"): the smallest power of two X with amax/X ≤ max_elem; never saturates.
- ``nearest``: amax/max_elem rounded to the nearest power of two (ties up, as an E8M0 cast).
- ``amax``: s = RN_sf(amax / max_elem) (integers: amax/qmax with qmax = 2^{b−1}−1, as PyTorch and the
  GPTQ reference; not amax/(qmax+½)). Two-level (NVFP4): s_t = RN_fp32(amax_tensor/(max_elem·max_sf)),
  s_b = RN_sf(amax_block/(max_elem·s_t)), effective scale s_b·s_t.
- ``signed_max`` (llama.cpp Q4_0, signed integers): s = RN_sf(m / qmin), m the signed value of the row's
  largest magnitude (the first on ties, as ``quantize_row_q4_0_ref`` and ``gguf.quants``), qmin = −2^{b−1}:
  m itself becomes the code qmin and the opposite extreme −m clamps to qmax; s < 0 when m > 0.
- Zero point (unsigned asymmetric): s = RN_sf((max(x,0) − min(x,0))/qmax), z = clamp(round(−min/s), 0, qmax).
- Sub-block offsets (``Scaling.sub_block_size`` k2, ``sub_offset_bits`` d2; shared microexponents, MX9/MX6/MX4):
  with E the row's exponent above (clamped), each sub-block j of k2 values gets E_j by the same rule from its
  own amax (float64) and τ_j = clamp(min(E − E_j, 2^d2 − 1, E − emin_sf), 0, ·); its values use 2^(E − τ_j).
  ``Scales.sub_offset`` holds τ ([R, L/k2] int64); rows holding NaN/inf get τ = 0 (their scale is NaN).
  The compiled cast finds the same τ per element instead (:func:`sub_block_factors`, ``floor`` rule): for
  j = 1 … 2^d2 − 1, E − E_j ≥ j ⟺ amax_j < 2^(E + emax_elem − j + 1), and j ≤ the limit ⟺ 2^E ≥ 2^(emin_sf + j),
  so τ_j is the number of these power-of-two thresholds its sub-block's amax lies below: comparisons of the
  values themselves, with no per-sub-block tensor and no exponent bits (inductor builds the maximum of a
  [R, L/k2, k2] view's sub-blocks from scalar loads, and writing τ out took longer than the cast itself;
  ``benchmarks/cast_kernels.py``).

Degenerate rows: an all-zero row gets the scale format's smallest positive value (for E8M0 2^−127, what
the floor rule's clamp of log2(0) = −inf gives), and so does any row whose scale would underflow to 0.
Scales above the scale format's max saturate to it. A single-level ``amax`` scale whose rounding up would put
the grid's top value max_elem·s above float32's largest finite value takes the scale format's value below instead
(a finite input never casts to inf; only rows with amax within about an ulp of 3.4e38, with FP32 scales). A row
holding NaN or ±inf gets a NaN scale (E8M0 0xFF), so the whole block dequantizes to NaN and the problem is
visible, never hidden.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from numcast.formats.element import cast_element, floor_log2, pow2
from numcast.formats.spec import Element, Scaling

FLOAT32_MAX = float(torch.finfo(torch.float32).max)


@dataclass
class Scales:
    """Per-row scales (float64, [R]), the optional per-tensor scale and the optional zero points.

    ``sub_offset`` ([R, L/sub_block] int64, or None): each sub-block's exponent offset τ, so the values of
    sub-block j of row r use the scale ``scale[r] · 2^−τ[r, j]`` (shared microexponents, see the module
    docstring); ``sub_block`` is the sub-block length (0 without offsets). ``sub_position`` ([1, L] in the rows'
    dtype, or None): each element's position in its sub-block, i mod ``sub_block``, given instead of
    ``sub_offset`` where the compiled cast finds τ per element (:func:`sub_block_factors`)."""

    scale: torch.Tensor | None
    tensor_scale: torch.Tensor | float | None = None
    zero_point: torch.Tensor | None = None
    sub_offset: torch.Tensor | None = None
    sub_block: int = 0
    inverse: torch.Tensor | None = None  # 1/scale [R] in a work dtype, exact (power-of-two rules): compute_scales'
    sub_position: torch.Tensor | None = None

    def reciprocal(self, work: torch.dtype) -> torch.Tensor:
        """1/scale, [R], in ``work`` (exact: used for power-of-two scales only). :func:`compute_scales` makes it
        beside the scales, so the compiled element kernel reads it instead of dividing once per vector of 8
        values (inductor hoists nothing out of that loop; README, speed notes); other scales (fixed by a solver,
        say) divide here."""
        if self.inverse is not None and self.inverse.dtype == work:
            return self.inverse
        return (1.0 / self.scale).to(work)

    def effective(self) -> torch.Tensor | None:
        """The per-row scale (times the tensor scale), [R]; sub-block offsets are not in it (see
        :meth:`per_element`)."""
        if self.scale is None:
            return None
        return self.scale * self.tensor_scale if self.tensor_scale is not None else self.scale

    def per_element(self) -> torch.Tensor | None:
        """The effective scale broadcastable against the [R, L] rows (float64): [R, 1], or [R, L] when sub-block
        offsets shift it (exact: a power of two times 2^−τ)."""
        s = self.effective()
        if s is None:
            return None
        if self.sub_offset is None:
            return s[:, None]
        per_sub = s[:, None] * pow2(-self.sub_offset.to(torch.int64), torch.float64)  # [R, L/k]
        r, n = per_sub.shape
        return per_sub[:, :, None].expand(r, n, self.sub_block).reshape(r, n * self.sub_block)

    def at(self, position: int) -> Scales:
        """The scales element ``position`` of every row sees, the sub-block offset folded into the scale (no
        offsets left): what one column of a block-scaled weight is cast with."""
        if self.sub_offset is None:
            return self
        tau = self.sub_offset[:, position // self.sub_block].to(torch.int64)
        return Scales(self.scale * pow2(-tau, torch.float64), self.tensor_scale, self.zero_point)


def row_range(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(amax, min, max) per row in float64; amax is NaN if the row has NaN, inf if it has ±inf; rows of length 0
    (an empty tensor's channels) have range 0."""
    if rows.shape[-1] == 0:
        z = rows.new_zeros(rows.shape[:-1], dtype=torch.float64)
        return z, z, z
    mn, mx = torch.aminmax(rows, dim=-1)
    mn, mx = mn.double(), mx.double()
    amax = torch.maximum(mx, -mn)
    has_nan = torch.isnan(mn) | torch.isnan(mx)
    return torch.where(has_nan, torch.full_like(amax, math.nan), amax), mn, mx


def row_amax(rows: torch.Tensor) -> torch.Tensor:
    """max |x| per row (NaN propagates), in the rows' dtype; 0 for rows of length 0."""
    if rows.shape[-1] == 0:
        return rows.new_zeros(rows.shape[:-1])
    if torch.compiler.is_compiling():  # fused into the cast's kernel
        return rows.abs().amax(dim=-1)
    # eager: two reductions instead of a full-size |x| temporary (fresh pages to fault in); + 0 makes −0 +0
    return torch.maximum(rows.amax(dim=-1), rows.amin(dim=-1).neg_()).add_(0.0)


def two_level_tensor_scale(amax: torch.Tensor, elem: Element, scale_format: Element) -> torch.Tensor:
    """The per-tensor scale of a two-level format (NVFP4) from the per-block amax [R] (float64) of the whole
    tensor: t = FP32(max amax / (elem max · scale format max)), the smallest FP32 subnormal where that underflows,
    1 for an all-zero tensor; a 0-dim float64 tensor holding an FP32 value (no host sync: compiles whole). The
    max runs over the finite blocks only: a block holding NaN/inf gets the NaN scale (that block is NaN), the
    others keep the tensor scale they would have without it."""
    finite = torch.where(torch.isfinite(amax), amax, torch.zeros_like(amax))
    t_amax = finite.max() if finite.numel() else finite.new_zeros(())
    t = (t_amax / (elem.max * scale_format.max)).float().double()
    t = torch.where(t == 0, torch.full_like(t, math.ldexp(1.0, -149)), t)  # FP32 underflow: smallest
    return torch.where(t_amax == 0, torch.ones_like(t), t)


def compute_scales(
    rows: torch.Tensor,
    elem: Element,
    scaling: Scaling,
    tensor_scale: torch.Tensor | float | None = None,
    offsets_per_element: bool = False,
) -> Scales:
    """Scales for [R, L] rows (see module docstring for the rules). ``tensor_scale`` fixes the two-level
    per-tensor scale instead of deriving it from these rows (a slab of a larger tensor). ``offsets_per_element``
    (the compiled cast): where :func:`offsets_per_element_exact` holds, leave the sub-block offsets to
    :func:`sub_block_factors` (``Scales.sub_position`` instead of ``sub_offset``)."""
    sf = scaling.scale_format
    if scaling.rule == "signed_max":
        return _signed_max_scales(rows, elem, sf)
    if scaling.rule != "amax":
        amax = row_amax(rows)
        if scaling.rule == "floor":  # exponent bits are exact in any dtype: no float64 detour
            e = floor_log2(amax) - elem.emax
        else:
            e = _pow2_exponent(amax.double(), elem, scaling.rule)
        e = e.clamp(sf.emin, sf.emax)
        scale = pow2(e, torch.float64)
        finite = torch.isfinite(amax)
        scale = torch.where(finite, scale, torch.full_like(scale, math.nan))
        k = scaling.sub_block_size
        if k and offsets_per_element and offsets_per_element_exact(elem, scaling, rows.dtype):
            position = (torch.arange(rows.shape[-1], device=rows.device) % k).to(rows.dtype)[None]
            return Scales(scale, sub_block=k, inverse=(1.0 / scale).to(rows.dtype), sub_position=position)
        if k:
            return Scales(scale, sub_offset=_sub_offsets(rows, e, finite, elem, scaling), sub_block=k)
        return Scales(scale, inverse=(1.0 / scale).to(rows.dtype))
    if scaling.zero_point:
        amax, mn, mx = row_range(rows)
    else:  # one abs-max reduction (NaN propagates, as in row_range): the same amax, ~25% faster compiled (NVFP4)
        amax = row_amax(rows).double()
    bad = ~torch.isfinite(amax)

    denom = elem.max
    if not scaling.tensor_scale:
        tensor_scale = None
    elif tensor_scale is not None:
        tensor_scale = torch.as_tensor(tensor_scale, dtype=torch.float64, device=amax.device)
        denom = elem.max * tensor_scale
    else:
        tensor_scale = two_level_tensor_scale(amax, elem, sf)
        denom = elem.max * tensor_scale
    zp = None
    if scaling.zero_point:
        lo = mn.clamp(max=0.0)
        q = (mx.clamp(min=0.0) - lo) / denom
    else:
        q = amax / denom
    q = q.nan_to_num(nan=0.0, posinf=0.0)
    s = cast_element(q, sf, "nearest_even", saturate=True)
    if not scaling.tensor_scale and not scaling.zero_point and elem.max * sf.max > FLOAT32_MAX:
        # a scale rounded up can put the grid's top value qmax·s past float32's largest finite value, so a finite
        # input (amax within an ulp of 3.4e38) would cast to inf: there take the scale format's value below q
        over = (s * elem.max > FLOAT32_MAX) & (amax <= FLOAT32_MAX)
        s = torch.where(over, cast_element(q, sf, "toward_zero", saturate=True), s)
    s = torch.where(s > 0, s, torch.full_like(s, sf.min_subnormal))
    s = torch.where(bad, torch.full_like(s, math.nan), s)
    if scaling.zero_point:
        zp = torch.round(-lo / s).clamp(0, elem.qmax).nan_to_num(0.0)
    return Scales(s, tensor_scale, zp)


def _signed_max_scales(rows: torch.Tensor, elem: Element, sf: Element) -> Scales:
    """The ``signed_max`` rule (module docstring): one scale per row, negative where the extreme is positive."""
    amax, _, _ = row_range(rows)
    if rows.shape[-1] == 0:
        m = amax
    else:
        first = rows.abs().argmax(dim=-1, keepdim=True)  # torch.argmax: the first maximal index
        m = rows.gather(-1, first).squeeze(-1).double()
    s = cast_element((m / elem.qmin).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0), sf, "nearest_even", saturate=True)
    s = torch.where(s != 0, s, torch.full_like(s, sf.min_subnormal))
    return Scales(torch.where(torch.isfinite(amax), s, torch.full_like(s, math.nan)))


def _sub_offsets(rows: torch.Tensor, e: torch.Tensor, finite: torch.Tensor, elem: Element, sc: Scaling) -> torch.Tensor:
    """τ [R, L/k2] (int64) of each sub-block of [R, L] rows whose (clamped) row exponents are ``e`` [R]."""
    sub_amax = row_amax(rows.reshape(rows.shape[0], -1, sc.sub_block_size)).double()
    e_sub = _pow2_exponent(sub_amax, elem, sc.rule)  # an all-zero sub-block: ~ −1100, the largest offset
    e = e.to(torch.int64)
    limit = (e - sc.scale_format.emin).clamp(max=2**sc.sub_offset_bits - 1)  # never below the smallest scale
    tau = torch.minimum(e[:, None] - e_sub, limit[:, None]).clamp(min=0)
    return torch.where(finite[:, None], tau, torch.zeros_like(tau))


def offsets_per_element_exact(elem: Element, scaling: Scaling, work: torch.dtype) -> bool:
    """Whether :func:`sub_block_factors` gives ``_sub_offsets``' τ and the exact scales for rows in ``work``: the
    ``floor`` rule, and in float32 every power of two it forms representable (1/2^E ≤ 2^127, the smallest
    threshold 2^(emin_sf + emax_elem + 1) ≥ 2^−149; E8M0 with any element here)."""
    if not scaling.sub_block_size or scaling.rule != "floor" or work not in (torch.float32, torch.float64):
        return False
    sf = scaling.scale_format
    return work == torch.float64 or (sf.emin >= -127 and sf.emax <= 127 and sf.emin + elem.emax + 1 >= -149)


def sub_block_factors(
    rows: torch.Tensor, scales: Scales, elem: Element, scaling: Scaling
) -> tuple[torch.Tensor, torch.Tensor]:
    """(2^τ, 2^−τ) for every element of [R, L] rows (rows' dtype, exact), τ its sub-block's offset found from
    the rows (module docstring; equal to ``_sub_offsets``' τ where :func:`offsets_per_element_exact` holds).
    ``scales``: the block scales 2^E ([R], float64, NaN for rows holding NaN/inf: τ = 0 there) and
    ``sub_position``. Each element sees its sub-block's amax through loads of its k − 1 neighbours, shifted
    copies of the row masked by the position: contiguous loads that inductor vectorises."""
    k, pos = scaling.sub_block_size, scales.sub_position
    a = rows.abs()
    sub = a
    for d in range(1, k):
        sub = torch.maximum(sub, torch.where(pos < k - d, F.pad(a[:, d:], (0, d)), 0.0))  # the one d places on
        sub = torch.maximum(sub, torch.where(pos >= d, F.pad(a[:, :-d], (d, 0)), 0.0))  # the one d places back
    s, sf = scales.scale, scaling.scale_format
    up, down = torch.ones_like(rows), torch.ones_like(rows)
    for j in range(1, 2**scaling.sub_offset_bits):
        allowed = s >= math.ldexp(1.0, sf.emin + j)  # j ≤ E − emin_sf (False for NaN scales)
        threshold = torch.where(allowed, s * math.ldexp(1.0, elem.emax - j + 1), 0.0).to(rows.dtype)
        below = sub < threshold[:, None]  # E − E_sub ≥ j
        up, down = torch.where(below, up * 2.0, up), torch.where(below, down * 0.5, down)
    return up, down


def _pow2_exponent(amax: torch.Tensor, elem: Element, rule: str) -> torch.Tensor:
    a = amax.nan_to_num(nan=0.0, posinf=0.0)
    if rule == "floor":
        return floor_log2(a) - elem.emax
    if rule == "ceil":
        e0 = floor_log2(a) - elem.emax
        return e0 + (a > elem.max * pow2(e0.clamp(-1022, 1023), torch.float64)).long()
    if rule == "nearest":
        q = a / elem.max
        f = floor_log2(q)
        return f + (q >= 1.5 * pow2(f.clamp(-1022, 1023), torch.float64)).long()
    raise ValueError(f"unknown power-of-two scale rule {rule!r}")
