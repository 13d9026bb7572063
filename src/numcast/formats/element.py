"""Element casts: real values → the nearest value of an integer or minifloat grid, and codes ↔ values.

The cast follows the TensorCast/OCP recipe (``../shared/design/papers.md`` §2): per-element exponent
e = max(floor(log2|y|), emin) read from the exponent bits (never ``log2``: pitfall 1), scale to an
integer grid with an exact power-of-two multiply, round, scale back, then overflow by policy. Work is done
in float32 when every power of two involved is a float32 normal and the quotient x/s rounded to float32 cannot
land on a rounding decision point it is not at (:func:`work_dtype`), else in float64; both are exact.
"""

from __future__ import annotations

import functools
import math

import torch

from numcast.formats.rounding import round_to_int
from numcast.formats.spec import Element, IntElement, Scaling

_F32_EXP = (-126, 127)
_F64_EXP = (-1022, 1023)
FINITE_CHECK_MIN = 1 << 14  # elements from which the eager cast_element checks all_finite first


def work_dtype(elem: Element, scaling: Scaling | None = None, input_dtype: torch.dtype = torch.float32) -> torch.dtype:
    """float32 where exact, else float64.

    Exact means: the grid's powers of two are normal numbers of the dtype, and with a scale that is not a power of
    two the quotient y = x/s, rounded once to the dtype, rounds onto the grid as the real x/s does. The rounding
    changes its answer only at decision points d (grid values for directed modes, midpoints between them for
    nearest), which have :func:`decision_bits` significant bits; s has :func:`scale_bits`. Where d·s fits the
    dtype's significand, d·s and a float32 x ≠ d·s are distinct numbers of the dtype, so x/s differs from d by
    more than half an ulp of d and the rounded quotient cannot land on d (nor cross it: rounding is monotone);
    float64 holds every such product here. NVFP4 (E2M1 midpoints 3 bits, s_b·s_t 4 + 24) and FP32-scaled
    formats (``int8_channel``: 8 + 24) need float64; FP16-scaled integer groups (``int4_g128``: 4 + 11) do
    not. (Constructed near-ties: ``tests/formats/test_near_ties.py``.)"""
    if input_dtype == torch.float64:
        return torch.float64
    pow2_scale = scaling is None or not scaling.scaled or scaling.power_of_two
    if not pow2_scale and decision_bits(elem) + scale_bits(scaling) > 24:
        return torch.float64
    if isinstance(elem, IntElement):
        ok = abs(elem.frac_bits) <= 100 and (elem.bits <= 11 or (pow2_scale and elem.bits <= 24))
        return torch.float32 if ok else torch.float64
    lo, hi = _F32_EXP
    ks = (elem.mbits - elem.emax - 1, elem.mbits - elem.emin, elem.emin - elem.mbits, elem.emax + 1 - elem.mbits)
    ok = all(lo <= k <= hi for k in ks) and (pow2_scale or elem.mbits <= 10)
    return torch.float32 if ok else torch.float64


def decision_bits(elem: Element) -> int:
    """Significant bits of the element grid's rounding decision points: midpoints between neighbouring grid
    values (one bit more than the grid's m + 1 for minifloats; (2k + 1)/2 for integers up to the largest
    magnitude), which also covers the grid values themselves (directed modes)."""
    if isinstance(elem, IntElement):
        return (2 * max(-elem.qmin, elem.qmax) - 1).bit_length()
    return elem.mbits + 2


def scale_bits(scaling: Scaling) -> int:
    """Significant bits of an effective scale: the scale format's, plus FP32's 24 for a two-level format's
    per-tensor factor (s_b·s_t)."""
    return scaling.scale_format.mbits + 1 + (24 if scaling.tensor_scale else 0)


def _int_view(dtype: torch.dtype) -> tuple[torch.dtype, int, int]:
    if dtype == torch.float32:
        return torch.int32, 23, 127
    if dtype == torch.float64:
        return torch.int64, 52, 1023
    raise TypeError(f"work dtype must be float32 or float64, got {dtype}")


def floor_log2(a: torch.Tensor) -> torch.Tensor:
    """floor(log2|a|) from the exponent bits (exact; zero and float subnormals give −bias−0, callers clamp)."""
    itype, mant, bias = _int_view(a.dtype)
    return ((a.view(itype) >> mant) & (2 * bias + 1)) - bias


def pow2(k: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """2^k exactly, for integer tensors k within the normal exponent range of ``dtype``."""
    itype, mant, bias = _int_view(dtype)
    return ((k.to(itype) + bias) << mant).view(dtype)


def grid_step(y: torch.Tensor, elem: Element) -> torch.Tensor:
    """The minifloat grid's spacing at each value of ``y`` (float32/float64), 2^(e − mbits) with
    e = clamp(floor(log2|y|), emin, emax + 1): :func:`floor_log2` and :func:`pow2` in one integer temporary worked on
    in place (the exponent field is clamped where it lies, then lowered by mbits); zero, subnormals, inf and NaN
    give the clamped ends as there. Needs 2^(emin − mbits) … 2^(emax + 1 − mbits) to be normal numbers of the dtype
    (:func:`work_dtype`)."""
    itype, mant, bias = _int_view(y.dtype)
    top = 2 * bias + 1  # the all-ones exponent field (inf, NaN)
    bits = y.view(itype) & (top << mant)
    bits.clamp_((elem.emin + bias) << mant, min(elem.emax + 1 + bias, top) << mant)
    return bits.sub_(elem.mbits << mant).view(y.dtype)


def arithmetic_rounding_exact(elem: Element, dtype: torch.dtype) -> bool:
    """Whether :func:`round_nearest_even_arithmetic` gives :func:`cast_element`'s bits for ``elem`` in the work
    ``dtype``: 2^emin is a normal number, |y| clamped to 2^(emax+1) times Veltkamp's 2^(p−1−m)+1 stays finite, and
    the split keeps at least two bits, m ≤ p − 3 (p: the dtype's significand bits, m: the element's)."""
    _, mant, bias = _int_view(dtype)
    p = mant + 1
    return elem.emin >= 1 - bias and elem.emax + 1 + p <= bias and elem.mbits <= p - 3


def round_nearest_even_arithmetic(y: torch.Tensor, elem: Element, saturate: bool = False) -> torch.Tensor:
    """``y`` rounded to the element grid, ties to even, without reading or writing exponent bits; before
    overflow handling (values beyond the grid come back larger than ``elem.max``, NaN stays NaN), or with
    ``saturate`` clamped to ±``elem.max``.

    Same values and signs as :func:`floor_log2` / :func:`pow2` / ``torch.round`` (``tests/formats/test_element.py``
    checks every float32 binade), for the compiled kernel: inductor writes a vector bit cast (``view(int32)``) as
    a scalar loop through a stack buffer, which on some CPUs costs more than the whole cast. Exact float steps
    instead (p = the work dtype's significand bits, 24 for float32; a = min(|y|, 2^(emax+1))):

    - Normal range, a ≥ 2^emin: Veltkamp's split (Dekker 1971, "A floating-point technique for extending the
      available precision", §6) with the constant 2^(p−1−m) + 1: c = a·2^(p−1−m) + a (an exact product, so an FMA
      gives the same c) and c − (c − a) is a rounded to m + 1 significant bits, to nearest with ties to even
      (checked on every float32 of a binade for every m, ``tests/formats/test_element.py``): the grid value.
    - Subnormal range, a < 2^emin: the step is the fixed 2^(emin−m); with the "magic number" M = 1.5·2^(p−1)·
      2^(emin−m), a + M lies in the binade of M, whose ulp is the step, so the addition rounds a to the grid (ties
      to even) and (a + M) − M is exact (Sterbenz).

    ``copysign`` restores the sign (also of results that round to zero). Clamping a at 2^(emax+1) keeps c finite;
    such values overflow the grid either way. ``saturate`` clamps a at max instead: max is a grid value and the
    rounding is monotone, so round(min(a, max)) = min(round(a), max), the saturated result, two operations per
    value fewer than clamping it afterwards. Needs :func:`arithmetic_rounding_exact`.
    """
    p = _int_view(y.dtype)[1] + 1
    a = y.abs().clamp(max=elem.max if saturate else math.ldexp(1.0, elem.emax + 1))
    c = a * math.ldexp(1.0, p - 1 - elem.mbits) + a
    normal = c - (c - a)
    magic = math.ldexp(1.5, p - 1 - elem.mbits + elem.emin)
    return torch.copysign(torch.where(a < math.ldexp(1.0, elem.emin), (a + magic) - magic, normal), y)


def cast_element(
    y: torch.Tensor,
    elem: Element,
    rounding: str = "nearest_even",
    noise: torch.Tensor | None = None,
    saturate: bool = True,
    arithmetic: bool | None = None,
    no_inf: bool = False,
) -> torch.Tensor:
    """Round ``y`` (float32/float64) to the element grid; same dtype and shape.

    ``arithmetic``: round to nearest even with :func:`round_nearest_even_arithmetic` instead of reading
    exponent bits (same bits); None: in compiled code (``torch.compiler.is_compiling()``) where
    :func:`arithmetic_rounding_exact` allows it, never in eager code, where bit views are free.

    Non-finite inputs: NaN stays NaN; ±inf stays ±inf in ``ieee`` formats and becomes NaN elsewhere (never a
    silent finite value). Finite overflow saturates to ±max when ``saturate`` (always for ``finite`` and
    integer grids), else becomes the policy's inf/NaN. ``fnuz`` has no −0: negative zeros become +0.
    ``fnu`` (E8M0) is unsigned without zero: zero and negative inputs become NaN (as ml_dtypes).

    ``no_inf``: the caller guarantees that ``y`` holds no ±inf (values divided by scales derived from their own
    block, where a non-finite block has a NaN scale), so the selects that handle inf are left out; NaN passes
    through the rest of the arithmetic.
    """
    # no ±inf in y: the caller says so, or one check of a large eager tensor finds it all finite; the selects that
    # handle inf are then skipped (below FINITE_CHECK_MIN elements, a GPTQ column say, they cost less than the
    # check's host sync; compiled code fuses them)
    inf_free = no_inf or (not torch.compiler.is_compiling() and y.numel() >= FINITE_CHECK_MIN and all_finite(y))
    if isinstance(elem, IntElement):
        # fresh temporaries are worked on in place: a new CPU tensor is new pages to fault in (benchmarks/formats.py)
        v = y * math.ldexp(1.0, elem.frac_bits) if elem.frac_bits else y
        r = v.round_() if v is not y and rounding == "nearest_even" else round_to_int(v, rounding, noise)
        out = r.clamp_(elem.qmin, elem.qmax).add_(0.0)  # integers have no −0
        if elem.frac_bits:
            out.mul_(math.ldexp(1.0, -elem.frac_bits))
        return out if inf_free else torch.where(torch.isfinite(y), out, torch.full_like(out, math.nan))

    if arithmetic is None:
        arithmetic = torch.compiler.is_compiling() and arithmetic_rounding_exact(elem, y.dtype)
    saturating = saturate or elem.policy == "finite"
    if arithmetic and rounding == "nearest_even":
        out = round_nearest_even_arithmetic(y, elem, saturating)  # no bit casts: see the function
        if not saturating:
            out = _overflow(out, elem)
    else:
        step = grid_step(y, elem)
        q = y / step  # exact: division by a power of two
        out = (q.round_() if rounding == "nearest_even" else round_to_int(q, rounding, noise)).mul_(step)
        out = out.clamp_(-elem.max, elem.max) if saturating else _overflow(out, elem)  # NaN passes through clamp
    if not inf_free:
        inf_in = y.abs() == math.inf  # (not isinf: compiles to a vector compare)
        out = torch.where(inf_in, y if elem.policy == "ieee" else torch.full_like(out, math.nan), out)
    if elem.policy == "fnuz":
        out = out + 0.0  # −0 + 0 = +0 under round-to-nearest
    elif elem.policy == "fnu":
        out = torch.where(y > 0, out, torch.full_like(out, math.nan))
        out = torch.where(out == 0, torch.full_like(out, elem.min_normal), out)
    return out


def _overflow(out: torch.Tensor, elem: Element) -> torch.Tensor:
    """Values rounded beyond ±max as the format's overflow: ±inf in ``ieee`` formats, NaN elsewhere."""
    if elem.policy == "ieee":
        return torch.where(out.abs() > elem.max, torch.copysign(torch.full_like(out, math.inf), out), out)
    return torch.where(out.abs() > elem.max, torch.full_like(out, math.nan), out)


def all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN or inf, by one reduction without temporaries (``torch.aminmax``: NaN
    propagates) and a host sync: eager code checks once and skips its full-size non-finite masks and selects,
    which on CPU cost more than the arithmetic around them."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


# ---- codes ↔ values -------------------------------------------------------------------------------


def lookup(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` for integer ``index`` of any shape with entries < 2^31: one ``index_select`` with an
    int32 index (faster on CPU than ``torch.take``, which needs an int64 copy of the index)."""
    return torch.index_select(table, 0, index.reshape(-1).int()).reshape(index.shape)


def code_dtype(bits: int) -> torch.dtype:
    """Smallest torch dtype holding raw ``bits``-bit codes as non-negative integers."""
    return torch.uint8 if bits <= 8 else torch.int32 if bits <= 16 else torch.int64


def decode(codes: torch.Tensor, elem: Element, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values of raw codes (bit patterns, non-negative integers < 2^bits)."""
    if elem.bits <= 16:
        table = decode_table(elem, dtype)
        return lookup(table.to(codes.device), codes)
    return _decode_arith(codes.long(), elem).to(dtype)


@functools.lru_cache(maxsize=256)
def decode_table(elem: Element, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """All 2^bits code values, index = code (the format's full decode table)."""
    return _decode_arith(torch.arange(2**elem.bits, dtype=torch.int64), elem).to(dtype)


def _decode_arith(c: torch.Tensor, elem: Element) -> torch.Tensor:
    if isinstance(elem, IntElement):
        v = c
        if elem.signed:
            v = torch.where(c >= 2 ** (elem.bits - 1), c - 2**elem.bits, c)
        out = v.double() * math.ldexp(1.0, -elem.frac_bits)
        if elem.narrow:
            out = torch.where(v < elem.qmin, torch.full_like(out, math.nan), out)
        return out
    m, eb = elem.mbits, elem.ebits
    man = (c & (2**m - 1)).double()
    expf = (c >> m) & (2**eb - 1)
    sign = ((c >> (eb + m)) & 1) if elem.signed else torch.zeros_like(c)
    if elem.policy == "fnu":
        mag = pow2(expf - elem.bias, torch.float64)
    else:
        normal = (man + 2**m) * pow2((expf - elem.bias - m).clamp(min=-1022), torch.float64)
        sub = man * math.ldexp(1.0, elem.emin - m)
        mag = torch.where(expf == 0, sub, normal)
    top = expf == 2**eb - 1
    nan = torch.zeros_like(top)
    if elem.policy == "ieee":
        mag = torch.where(top & (man == 0), torch.full_like(mag, math.inf), mag)
        nan = top & (man != 0)
    elif elem.policy in ("fn", "fnu"):
        nan = top & (man == 2**m - 1)
    elif elem.policy == "fnuz":
        nan = (sign == 1) & (expf == 0) & (man == 0)
    out = torch.where(sign == 1, -mag, mag)
    return torch.where(nan, torch.full_like(out, math.nan), out)


def encode(values: torch.Tensor, elem: Element) -> torch.Tensor:
    """Raw codes of values that lie on the element grid (as produced by :func:`cast_element`).

    NaN encodes to the policy's NaN code (sign kept where the format has signed NaNs); a format without
    NaN (``finite``, integers) raises ``ValueError`` naming the count, since its codes cannot say NaN.
    """
    dt = code_dtype(elem.bits)
    finite = all_finite(values)
    nan = None if finite else torch.isnan(values)
    n_nan = 0 if nan is None else int(nan.sum())
    if n_nan and not elem.has_nan:
        raise ValueError(f"{n_nan} NaN/inf value(s) cannot be encoded in {elem.name}, which has no NaN code")
    if isinstance(elem, IntElement):
        q = (values * math.ldexp(1.0, elem.frac_bits)).round().to(torch.int64)
        return (q & (2**elem.bits - 1)).to(dt)
    x, table = values, pattern_codes(elem, values.dtype)
    if table is None:  # other dtypes, or values that are not all normal in this one: float64
        x, table = values.double(), pattern_codes(elem, torch.float64)
    if finite and table is not None:
        return _encode_finite_by_pattern(x, elem, table.to(x.device))
    if nan is None:
        nan = torch.zeros_like(values, dtype=torch.bool)
    m, eb = elem.mbits, elem.ebits
    sign = torch.signbit(x).long() if elem.signed else torch.zeros_like(x, dtype=torch.long)
    a = x.abs().nan_to_num(nan=0.0, posinf=0.0)
    if table is not None:  # the finite magnitudes by their bit patterns; NaN/inf codes set below
        magnitude = _encode_finite_by_pattern(a, elem, table.to(a.device)).long()
    else:
        magnitude = _magnitude_code_bits(a, elem)
    code = (sign << (eb + m)) | magnitude
    if elem.policy == "ieee":
        inf = torch.isinf(x)
        code = torch.where(inf, (sign << (eb + m)) | ((2**eb - 1) << m), code)
        qnan = (sign << (eb + m)) | ((2**eb - 1) << m) | (1 << max(m - 1, 0))
        code = torch.where(nan, qnan, code)
    elif elem.policy in ("fn", "fnu"):
        code = torch.where(nan, (sign << (eb + m)) | (2 ** (eb + m) - 1), code)
    elif elem.policy == "fnuz":
        code = torch.where(nan, torch.full_like(code, 1 << (elem.bits - 1)), code)
        code = torch.where((code == 1 << (elem.bits - 1)) & ~nan, torch.zeros_like(code), code)
    return code.to(dt)


def _encode_finite_by_pattern(values: torch.Tensor, elem: Element, table: torch.Tensor) -> torch.Tensor:
    """:func:`encode` of finite grid values by :func:`pattern_codes`: the top bits of each value's IEEE pattern
    index the table (a shift and a mask in the integer view, one gather into the code dtype: three passes)."""
    return lookup(table, _pattern_index(values, elem, table.numel()))


def _pattern_index(values: torch.Tensor, elem: Element, size: int) -> torch.Tensor:
    """The index of :func:`pattern_codes` (``size`` entries): the sign, exponent and top ``mbits`` mantissa bits of
    each float32/float64 value's IEEE pattern."""
    itype, mant, _ = _int_view(values.dtype)
    return (values.view(itype) >> (mant - elem.mbits)).bitwise_and_(size - 1)


@functools.lru_cache(maxsize=256)
def pattern_codes(elem: Element, dtype: torch.dtype) -> torch.Tensor | None:
    """The code of each finite grid value of ``elem`` at the index its ``dtype`` (float32/float64) bit pattern
    has in its sign, exponent and top ``mbits`` mantissa bits (a table of 2^(1 + exponent bits + mbits) entries
    in the code dtype: 4 KiB for E4M3 in float32), for minifloats of ≤ 8 bits whose every finite value is a
    normal number or zero in ``dtype`` — the lower mantissa bits of a grid value are then zero and the index
    tells its value apart from every other (checked here: None where two values would collide or one does not
    convert exactly, for integer grids and other dtypes). ``fnuz`` formats, without −0, give −0 the code of +0;
    entries of bit patterns that are not grid values are never read for grid values (:func:`encode` requires
    them; its NaN/inf positions are masked first)."""
    if isinstance(elem, IntElement) or elem.bits > 8 or dtype not in (torch.float32, torch.float64):
        return None
    size = 2 ** (1 + (8 if dtype == torch.float32 else 11) + elem.mbits)
    codes = torch.arange(2**elem.bits)
    exact = decode(codes, elem, torch.float64)
    finite = torch.isfinite(exact)
    v = exact[finite].to(dtype)
    if not torch.equal(v.double(), exact[finite]) or bool(((v != 0) & (v.abs() < torch.finfo(dtype).tiny)).any()):
        return None  # a value that does not convert exactly, or a subnormal of dtype
    if len(set(_pattern_index(v, elem, size).tolist())) != v.numel():
        return None
    table = torch.zeros(size, dtype=code_dtype(elem.bits))
    table[_pattern_index(v, elem, size)] = codes[finite].to(table.dtype)
    if elem.policy == "fnuz":  # −0 (a rounding result) is code 0
        table[_pattern_index(torch.tensor([-0.0], dtype=dtype), elem, size)] = 0
    return table


def _magnitude_code_bits(a: torch.Tensor, elem: Element) -> torch.Tensor:
    """Exponent and mantissa fields (int64) of the non-negative float64 grid values ``a``, from their bits."""
    m = elem.mbits
    e = floor_log2(a).clamp(min=elem.emin)
    if elem.policy == "fnu":
        return (e + elem.bias) << m
    is_sub = a < elem.min_normal
    man_n = (a * pow2(m - e, torch.float64)).long() - 2**m
    man_s = (a * math.ldexp(1.0, m - elem.emin)).long()
    man = torch.where(is_sub, man_s, man_n)
    expf = torch.where(is_sub, torch.zeros_like(e), e + elem.bias)
    return (expf << m) | man
