"""Number formats described as data.

A :class:`Format` is a frozen, hashable triple of an element format (:class:`IntElement` or
:class:`FloatElement`), a :class:`Scaling` scheme and defaults (rounding, overflow).  Every figure a
user or a hardware engineer asks for (bits per value, max, min normal, min subnormal, ...) is derived
from these fields, never stored twice.

References: OCP 8-bit Floating Point Specification (OFP8) rev 1.0 (E4M3 ``fn``: no inf, S.1111.111 is
NaN, max 448; E5M2 IEEE-like); OCP Microscaling Formats (MX) v1.0 §5 (element formats FP8/FP6/FP4/INT8,
E8M0 scale, block 32); ml_dtypes for the ``fnuz`` variants (bias 8/16, −0 encodes NaN); Rouhani et al.,
"With Shared Microexponents, A Little Shifting Goes a Long Way" (ISCA 2023) for the sub-block exponent
offsets of MX9/MX6/MX4 (:class:`Scaling` ``sub_block_size``/``sub_offset_bits``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

Policy = Literal["ieee", "fn", "fnuz", "finite", "fnu"]
POLICIES: tuple[str, ...] = ("ieee", "fn", "fnuz", "finite", "fnu")
ROUNDINGS: tuple[str, ...] = (
    "nearest_even",
    "nearest_away",
    "toward_zero",
    "floor",
    "ceil",
    "stochastic",
)
Granularity = Literal["none", "tensor", "channel", "block"]
ScaleRule = Literal["floor", "ceil", "nearest", "amax", "signed_max"]
SCALE_RULES: tuple[str, ...] = ("floor", "ceil", "nearest", "amax", "signed_max")


@dataclass(frozen=True)
class IntElement:
    """A fixed-point integer element: value = code · 2^−frac_bits.

    ``bits`` 2–16 (1 allowed only unsigned). Signed codes are two's complement; ``narrow`` drops the most
    negative code so the grid is symmetric (−(2^{b−1}−1) … 2^{b−1}−1). ``frac_bits`` makes the element a
    fixed-point number (MXINT8: 6, OCP MX v1.0 §5.3: values k·2^−6); plain integers use 0.
    """

    bits: int
    signed: bool = True
    narrow: bool = False
    frac_bits: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 16:
            raise ValueError(f"integer element: bits must be an int in 2..16, got {self.bits!r}")
        if self.narrow and not self.signed:
            raise ValueError("integer element: narrow range applies to signed integers only")
        if not -64 <= self.frac_bits <= 64:
            raise ValueError(f"integer element: frac_bits must be in -64..64, got {self.frac_bits}")

    kind = "int"

    @property
    def qmin(self) -> int:
        """Smallest integer code value."""
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.narrow else 0)

    @property
    def qmax(self) -> int:
        """Largest integer code value."""
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def max(self) -> float:
        return math.ldexp(self.qmax, -self.frac_bits)

    @property
    def min_subnormal(self) -> float:
        """Smallest positive value (one code step)."""
        return math.ldexp(1.0, -self.frac_bits)

    @property
    def min_normal(self) -> float:
        return self.min_subnormal

    @property
    def emax(self) -> int:
        """floor(log2(max)): the element exponent the OCP shared-scale rule aligns to."""
        return math.frexp(self.max)[1] - 1

    @property
    def mbits(self) -> int:
        """Magnitude bits (significant bits below the sign)."""
        return self.bits - 1 if self.signed else self.bits

    @property
    def has_inf(self) -> bool:
        return False

    @property
    def has_nan(self) -> bool:
        return False

    @property
    def name(self) -> str:
        base = f"{'' if self.signed else 'u'}int{self.bits}"
        return base + ("n" if self.narrow else "") + (f"f{self.frac_bits}" if self.frac_bits else "")


@dataclass(frozen=True)
class FloatElement:
    """A binary minifloat: 1 sign bit (unless unsigned), ``ebits`` exponent bits, ``mbits`` mantissa bits.

    ``bias`` defaults to 2^{e−1}−1. Subnormals always exist (exponent field 0), except for policy
    ``fnu``. Inf/NaN policies:

    - ``ieee``: top exponent field reserved: mantissa 0 = ±inf, else NaN (FP16, BF16, E5M2).
    - ``fn``: no inf; only S.1…1.1…1 is NaN (OCP E4M3, max 448).
    - ``fnuz``: no inf, no −0; the code 1.0…0 (−0) is NaN (ml_dtypes/torch float8_*fnuz).
    - ``finite``: every code is a number, no inf or NaN (OCP FP6/FP4).
    - ``fnu``: unsigned, no zero, no subnormals, all-ones is NaN (OCP E8M0, mbits 0).
    """

    ebits: int
    mbits: int
    bias: int | None = None
    policy: Policy = "ieee"
    signed: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.ebits, int) or not 1 <= self.ebits <= 8:
            raise ValueError(f"float element: exponent bits must be an int in 1..8, got {self.ebits!r}")
        if not isinstance(self.mbits, int) or not 0 <= self.mbits <= 23:
            raise ValueError(f"float element: mantissa bits must be an int in 0..23, got {self.mbits!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"float element: unknown inf/NaN policy {self.policy!r}; one of {POLICIES}")
        if self.bias is None:
            object.__setattr__(self, "bias", 2 ** (self.ebits - 1) - 1)
        if self.policy == "fnu" and (self.signed or self.mbits != 0):
            raise ValueError("float element: policy 'fnu' (E8M0 style) needs signed=False and mbits=0")
        if not self.signed and self.policy != "fnu":
            raise ValueError("float element: only policy 'fnu' is unsigned")
        if not isinstance(self.bias, int) or isinstance(self.bias, bool):
            raise ValueError(f"float element: bias must be an int, got {self.bias!r}")
        if self.policy == "ieee" and (self.mbits < 1 or self.ebits < 2):
            raise ValueError(
                f"float element: policy 'ieee' reserves the top exponent for inf (mantissa 0) and NaN (mantissa != 0), "
                f"so it needs >= 1 mantissa bit and >= 2 exponent bits, got e{self.ebits}m{self.mbits}; use policy "
                "'fn', 'fnuz' or 'finite'"
            )
        if self.policy == "ieee" and self.ebits == 1:
            raise ValueError("float element: an 'ieee' format needs >= 2 exponent bits (one field is reserved)")
        if self.policy == "fn" and self.ebits + self.mbits < 2:
            raise ValueError("float element: policy 'fn' needs at least 2 exponent+mantissa bits")
        if self.emax + 1 > 1023 or self.emin - self.mbits < -1022:
            raise ValueError("float element: range exceeds float64; pick a smaller bias or fewer exponent bits")

    kind = "float"

    @property
    def bits(self) -> int:
        return int(self.signed) + self.ebits + self.mbits

    @property
    def emin(self) -> int:
        """Unbiased exponent of the smallest normal (and of the subnormal spacing)."""
        return 1 - self.bias if self.policy != "fnu" else -self.bias

    @property
    def emax(self) -> int:
        """Unbiased exponent of the largest finite value."""
        top = 2**self.ebits - 1
        if self.policy == "ieee":
            top -= 1
        elif self.policy in ("fn", "fnu") and self.mbits == 0:
            top -= 1  # all-ones code is NaN and there is no mantissa to spare
        return top - self.bias

    @property
    def max(self) -> float:
        mant_max = 2**self.mbits - 1
        if self.policy == "fn" and self.mbits > 0:
            mant_max -= 1  # S.1…1.1…1 is NaN
        return math.ldexp(1.0 + mant_max / 2**self.mbits, self.emax)

    @property
    def min_normal(self) -> float:
        return math.ldexp(1.0, self.emin)

    @property
    def min_subnormal(self) -> float:
        if self.policy == "fnu":
            return self.min_normal
        return math.ldexp(1.0, self.emin - self.mbits)

    @property
    def has_inf(self) -> bool:
        return self.policy == "ieee"

    @property
    def has_nan(self) -> bool:
        return self.policy != "finite"

    @property
    def name(self) -> str:
        default_bias = self.bias == 2 ** (self.ebits - 1) - 1
        return f"e{self.ebits}m{self.mbits}" + ("" if default_bias else f"b{self.bias}") + f"_{self.policy}"


Element = IntElement | FloatElement

# Scale element formats used by the named formats.
E8M0 = FloatElement(8, 0, 127, "fnu", signed=False)
FP32 = FloatElement(8, 23, 127, "ieee")
FP16 = FloatElement(5, 10, 15, "ieee")
BF16 = FloatElement(8, 7, 127, "ieee")
E4M3 = FloatElement(4, 3, 7, "fn")


@dataclass(frozen=True)
class Scaling:
    """How scales are shared and computed.

    - ``granularity``: ``none`` (the element grid itself), ``tensor`` (one scale), ``channel`` (one scale per
      index of ``axis``, reduced over all other dims), ``block`` (1-D blocks of ``block_size`` along ``axis``).
    - ``axis``: channel axis (default 0) or the axis blocks run along (default −1, the reduction axis of
      a Linear weight [out, in]).
    - ``scale_format``: the number format the scale is stored in (E8M0 for MX; FP16/FP32/BF16/E4M3 ...).
    - ``rule``: ``floor`` (OCP MX v1.0 §6.3: 2^(floor(log2 amax) − emax_elem)), ``ceil`` (smallest power of
      two s with amax/s ≤ max_elem: never saturates; NVIDIA's RCEIL), ``nearest`` (amax/max_elem rounded to
      the nearest power of two, ties up as E8M0 casts do), ``amax`` (s = amax/max_elem, rounded to
      ``scale_format``; integer grids: amax/qmax with qmax = 2^{b−1}−1, the PyTorch/GPTQ choice rather than
      amax/(qmax+0.5)), ``signed_max`` (llama.cpp's Q4_0 rule, ``ggml-quants.c`` ``quantize_row_q4_0_ref``:
      s = m/qmin with m the signed value of the row's largest magnitude, first occurrence on ties, and
      qmin = −2^{b−1}; the scale is negative when m > 0, so m lands on the grid's extra negative code and
      the whole two's-complement range is used). Power-of-two rules need an E8M0 (``fnu``) scale format;
      ``signed_max`` a signed, not narrow, integer element.
    - ``tensor_scale``: two-level scaling (NVFP4): an FP32 per-tensor scale amax/(max_elem·max_scale) makes
      the block scales use the scale format's whole range.
    - ``zero_point``: asymmetric unsigned integers: q = clamp(round(x/s) + z), x̂ = (q − z)·s.
    - ``sub_block_size`` k2 and ``sub_offset_bits`` d2: shared microexponents (Rouhani et al., ISCA 2023,
      "With Shared Microexponents, A Little Shifting Goes a Long Way"; MX9/MX6/MX4 are k1 = 16, d1 = 8 (E8M0),
      k2 = 2, d2 = 1, with sign + 7/4/2-bit magnitudes). Each sub-block of k2 consecutive values of a block
      stores a d2-bit offset τ and its values use the scale 2^(E − τ), E the block's shared exponent. Needs a
      power-of-two rule (E8M0 scale); any element. The rules, and numcast's choices where the paper leaves one:

      * E: the block's exponent by ``rule`` (``floor``: OCP's floor(log2 amax) − emax_elem, which for the
        paper's mantissas k·2^−(m−1) is its "largest element exponent"), clamped to E8M0's −127…127.
      * τ_j = min(E − E_j, 2^d2 − 1, E − emin_scale) clamped at 0, E_j the sub-block's exponent by the same rule
        on its own amax (float64; an all-zero sub-block has E_j = −∞): the paper's min(E − E_j, 2^d2 − 1), so for
        d2 = 1 a sub-block shifts down one power of two exactly when both its values lie below 2^E; the third
        term (E + 127 for E8M0) keeps the scale at or above 2^−127, an edge the paper does not address.
      * Offsets come from the exponents before rounding, as the OCP floor rule chooses E: a value just below
        2^(E−τ+1) may round up past the largest magnitude (2^m − 1)·2^(E−τ−(m−1)) and saturates to it (error
        below one step of its grid, never more than the coarser grid's).
      * Elements round by the format's rounding (default nearest-even) and saturate. Integer codes are two's
        complement and narrow: the sign-magnitude value set (the spare code, sign-magnitude's −0, is unused); a
        value rounding to zero is +0.
      * A block holding NaN/inf gets the NaN scale (the whole block is NaN, as every block format) and τ = 0.
      * Stored: k1/k2 offsets of d2 bits per block after the scales, so a value costs element bits +
        (scale bits + d2·k1/k2)/k1 (MX9: 8 + (8 + 8)/16 = 9 bits).
    """

    granularity: Granularity = "none"
    block_size: int | None = None
    axis: int | None = None
    scale_format: FloatElement = FP32
    rule: ScaleRule = "amax"
    tensor_scale: bool = False
    zero_point: bool = False
    sub_block_size: int | None = None
    sub_offset_bits: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.scale_format, FloatElement):
            raise TypeError(f"scaling: scale_format must be a FloatElement (e.g. numcast.formats.E8M0, FP16), got "
                            f"{type(self.scale_format).__name__} {self.scale_format!r}")  # fmt: skip
        if self.granularity not in ("none", "tensor", "channel", "block"):
            raise ValueError(f"scaling: unknown granularity {self.granularity!r}")
        if self.granularity == "block":
            if not isinstance(self.block_size, int) or self.block_size < 1:
                raise ValueError(f"scaling: block size must be a positive int, got {self.block_size!r}")
            if self.block_size > 65536:
                raise ValueError(f"scaling: block size {self.block_size} exceeds 65536")
        elif self.block_size is not None:
            raise ValueError(f"scaling: block size is only meaningful for block granularity, not {self.granularity}")
        if self.axis is None:
            object.__setattr__(self, "axis", 0 if self.granularity == "channel" else -1)
        if self.rule not in SCALE_RULES:
            raise ValueError(f"scaling: unknown scale rule {self.rule!r}; one of {SCALE_RULES}")
        if self.power_of_two and self.scale_format.policy != "fnu":
            raise ValueError(f"scaling: power-of-two rule {self.rule!r} needs an E8M0 scale format")
        if self.tensor_scale and self.granularity != "block":
            raise ValueError("scaling: a two-level tensor scale needs block granularity")
        if self.sub_block_size is not None or self.sub_offset_bits:
            self._check_sub_blocks()

    def _check_sub_blocks(self) -> None:
        k, d = self.sub_block_size, self.sub_offset_bits
        if self.granularity != "block":
            raise ValueError(f"scaling: sub-block exponent offsets need block granularity, not {self.granularity}")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k < self.block_size or self.block_size % k:
            raise ValueError(f"scaling: sub-block size must be an int below the block size {self.block_size} that "
                             f"divides it, got {k!r}")  # fmt: skip
        if not isinstance(d, int) or isinstance(d, bool) or not 1 <= d <= 8:
            raise ValueError(f"scaling: sub-block offset bits must be an int in 1..8, got {d!r}")
        if self.rule not in ("floor", "ceil", "nearest"):
            raise ValueError(f"scaling: sub-block offsets shift a power-of-two scale; rule {self.rule!r} is not one "
                             "('floor', 'ceil' or 'nearest' with an E8M0 scale format)")  # fmt: skip
        if self.tensor_scale or self.zero_point:
            raise ValueError("scaling: sub-block offsets have no form with a tensor scale or a zero point")

    @property
    def sub_blocks_per_block(self) -> int:
        """Sub-blocks (offsets) per block: block_size / sub_block_size, 0 without sub-block offsets."""
        return self.block_size // self.sub_block_size if self.sub_block_size else 0

    @property
    def scaled(self) -> bool:
        return self.granularity != "none"

    @property
    def power_of_two(self) -> bool:
        """Whether every scale is a power of two (the floor/ceil/nearest rules; amax and signed_max round a
        quotient to the scale format)."""
        return self.rule not in ("amax", "signed_max")


@dataclass(frozen=True)
class Format:
    """A number format: element + scaling + default rounding and overflow behaviour.

    ``saturate=True`` (default, the usual choice for quantization and OCP's "satfinite") clamps finite
    values beyond the largest representable magnitude to ±max; ``False`` gives the element policy's
    overflow value (inf for ``ieee``, NaN for ``fn``/``fnuz``/``fnu``; ``finite`` formats always saturate).
    """

    element: Element
    scaling: Scaling = field(default_factory=Scaling)
    rounding: str = "nearest_even"
    saturate: bool = True
    name: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.element, (IntElement, FloatElement)):
            raise TypeError(f"format: element must be an IntElement or FloatElement, got {type(self.element).__name__} "
                            f"{self.element!r} (a format name goes through numcast.get_format)")  # fmt: skip
        if not isinstance(self.scaling, Scaling):
            raise TypeError(f"format: scaling must be a Scaling, got {type(self.scaling).__name__}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"format: unknown rounding {self.rounding!r}; one of {ROUNDINGS}")
        if self.scaling.zero_point and (self.element.kind != "int" or self.element.signed):
            raise ValueError("format: a zero point needs an unsigned integer element")
        if self.scaling.zero_point and self.scaling.rule != "amax":
            raise ValueError("format: a zero point needs the 'amax' scale rule")
        el = self.element
        if self.scaling.rule == "signed_max" and (el.kind != "int" or not el.signed or el.narrow or el.frac_bits):
            raise ValueError("format: the 'signed_max' scale rule needs a signed two's-complement integer element "
                             "(not narrow, no fraction bits)")  # fmt: skip
        if self.scaling.rule == "signed_max" and self.scaling.tensor_scale:
            raise ValueError("format: the 'signed_max' scale rule has no two-level form")
        if self.element.kind == "float" and self.element.policy == "fnu" and self.scaling.scaled:
            raise ValueError("format: an unsigned E8M0-style element cannot be scaled")

    # ---- figures -------------------------------------------------------------------------------
    @property
    def label(self) -> str:
        return self.name or describe(self)

    @property
    def bits(self) -> int:
        """Element bits."""
        return self.element.bits

    @property
    def block_size(self) -> int | None:
        return self.scaling.block_size

    @property
    def bits_per_value(self) -> float:
        """Storage bits per value including block scales and zero points.

        Per-tensor and per-channel scales are amortised over a tensor whose size this format does not know:
        they count as 0 here; ``QTensor.nbytes`` gives the exact size of a concrete tensor.
        """
        b = float(self.element.bits)
        if self.scaling.granularity == "block":
            per_block = self.scaling.scale_format.bits + (self.element.bits if self.scaling.zero_point else 0)
            per_block += self.scaling.sub_blocks_per_block * self.scaling.sub_offset_bits
            b += per_block / self.scaling.block_size
        return b

    @property
    def scale_format_name(self) -> str | None:
        if not self.scaling.scaled:
            return None
        return SCALE_NAMES.get(self.scaling.scale_format, self.scaling.scale_format.name)

    def figures(self) -> dict:
        """The figures ``numcast formats`` prints (element units: the scale multiplies them)."""
        e = self.element
        return {
            "name": self.label,
            "element": e.name,
            "bits": e.bits,
            "bits_per_value": self.bits_per_value,
            "max": e.max,
            "min_normal": e.min_normal,
            "min_subnormal": e.min_subnormal,
            "mantissa_bits": e.mbits,
            "granularity": self.scaling.granularity,
            "block_size": self.scaling.block_size,
            "scale_format": self.scale_format_name,
            "scale_rule": self.scaling.rule if self.scaling.scaled else None,
            "tensor_scale": self.scaling.tensor_scale,
            "zero_point": self.scaling.zero_point,
            "sub_block_size": self.scaling.sub_block_size,
            "sub_offset_bits": self.scaling.sub_offset_bits,
        }

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The fields as plain data; the sub-block keys appear only when set, so formats without sub-block
        offsets serialise exactly as before they existed."""
        d = asdict(self)
        d["element"]["kind"] = self.element.kind
        if self.scaling.sub_block_size is None and not self.scaling.sub_offset_bits:
            del d["scaling"]["sub_block_size"], d["scaling"]["sub_offset_bits"]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @staticmethod
    def from_dict(d: dict) -> Format:
        """The format of :meth:`to_dict`; ``ValueError`` naming what is missing or wrong otherwise."""
        try:
            d = dict(d)
            el = dict(d.pop("element"))
            kind = el.pop("kind")
            if kind not in ("int", "float"):
                raise ValueError(f"element kind {kind!r} is neither 'int' nor 'float'")
            element: Element = IntElement(**el) if kind == "int" else FloatElement(**el)
            sc = dict(d.pop("scaling"))
            sc["scale_format"] = FloatElement(**sc["scale_format"])
            return Format(element=element, scaling=Scaling(**sc), **d)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a numcast format description ({type(exc).__name__}: {exc}); expected the keys "
                             "'element' (with 'kind'), 'scaling' (with 'scale_format'), 'rounding'") from exc

    @staticmethod
    def from_json(s: str) -> Format:
        try:
            d = json.loads(s)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a numcast format description: invalid JSON ({exc})") from exc
        if not isinstance(d, dict):
            raise ValueError(f"not a numcast format description: a JSON object is expected, got {type(d).__name__}")
        return Format.from_dict(d)

    def with_(self, **changes) -> Format:
        """A copy with fields changed (``rounding``, ``saturate``, ``scaling``...); the name is dropped
        unless given, since the result is another format."""
        changes.setdefault("name", None)
        return replace(self, **changes)


SCALE_NAMES: dict[FloatElement, str] = {E8M0: "e8m0", FP32: "fp32", FP16: "fp16", BF16: "bf16", E4M3: "fp8_e4m3"}


def describe(fmt: Format) -> str:
    """A readable description for unnamed formats."""
    s = fmt.scaling
    parts = [fmt.element.name]
    if s.granularity == "block":
        parts.append(f"b{s.block_size}@{s.axis}")
    elif s.granularity == "channel":
        parts.append(f"channel@{s.axis}")
    elif s.granularity == "tensor":
        parts.append("tensor")
    if s.scaled:
        parts.append(f"{SCALE_NAMES.get(s.scale_format, s.scale_format.name)}:{s.rule}")
    if s.sub_block_size:
        parts.append(f"offset{s.sub_offset_bits}b/{s.sub_block_size}")
    if s.tensor_scale:
        parts.append("x fp32")
    if s.zero_point:
        parts.append("zp")
    return " ".join(parts)
