"""Named formats: the one table that tests, the CLI and the docs iterate over, and the name grammar.

Grammar (case-insensitive), element part then an optional scaling suffix:

- integers ``int<b>`` / ``uint<b>`` (b = 2..16); ``intn<b>`` is the narrow (symmetric) range.
- minifloats ``fp<bits>_e<E>m<M>[b<bias>][_fn|_fnuz|_ieee|_finite]`` or ``e<E>m<M>...``; the default
  policy is ``fn`` for E4M3 (OCP), ``ieee`` for 8+ bits otherwise, ``finite`` below 8 bits (OCP FP6/FP4).
  ``bf16``, ``fp16``, ``fp32``, ``e8m0``.
- scaling suffix ``_g<G>`` (FP16 scale per group of G along the last axis, the reduction axis),
  ``_channel`` (FP32 scale per output channel, axis 0), ``_tensor`` (one FP32 scale), ``_zp`` (zero point,
  unsigned integers only).
- block formats: ``mx<element>[_b<B>]`` (OCP MX v1.0: E8M0 scale, floor rule, block 32: ``mxfp8_e4m3``,
  ``mxfp8_e5m2``, ``mxfp6_e2m3``, ``mxfp6_e3m2``, ``mxfp4``, ``mxint8``), ``nvfp4`` (E2M1, block 16, E4M3
  scale, FP32 tensor scale), ``bfp<b>_b<B>`` (block floating point: E8M0 shared exponent, b-bit
  sign-magnitude mantissa with b−2 fraction bits, so bfp8_b32 has MXINT8's grid).
- shared microexponents (Rouhani et al., ISCA 2023): ``mx9``, ``mx6``, ``mx4``: blocks of 16 with an E8M0
  shared exponent (floor rule), a 1-bit exponent offset per sub-block of 2, and sign-magnitude mantissas of
  7, 4, 2 bits (the grids of ``bfp8``/``bfp5``/``bfp3``: k·2^−(m−1), |k| ≤ 2^m − 1), 9/6/4 bits per value.
  Other sub-block sizes and offset widths: a :class:`Scaling` with ``sub_block_size``/``sub_offset_bits``
  and :func:`register_format`.
- llama.cpp's grids (``ggml-quants.c``): ``gguf_q4_0`` (int4 −8…7, FP16 scale per 32, ``signed_max`` rule:
  d = signed max / −8) and ``gguf_q8_0`` (int8, FP16 scale amax/127 per 32; the grid of ``int8_g32``), so a
  solver can target exactly what ``numcast export --to gguf`` stores as Q4_0 / Q8_0.
"""

from __future__ import annotations

import difflib
import re

from numcast.formats.spec import BF16, E4M3, E8M0, FP16, FP32, FloatElement, Format, IntElement, Scaling

FormatLike = str | Format

_REGISTRY: dict[str, Format] = {}

_BUILTIN = [
    *[f"int{b}" for b in range(2, 9)],
    *[f"uint{b}" for b in range(2, 9)],
    "fp8_e4m3", "fp8_e5m2", "fp8_e4m3fnuz", "fp8_e5m2fnuz",
    "fp6_e2m3", "fp6_e3m2", "fp4_e2m1", "e8m0", "bf16", "fp16",
    "mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp4", "mxint8", "nvfp4",
    "bfp8_b16", "bfp6_b16", "bfp4_b16", "mx9", "mx6", "mx4",
    "int8_channel", "int4_channel", "int3_channel", "int4_g128", "int3_g64", "int2_g64", "int8_g32",
    "uint4_g128_zp", "fp8_e4m3_tensor", "gguf_q4_0", "gguf_q8_0",
]  # fmt: skip
_GGUF_GRIDS = {
    "gguf_q4_0": (IntElement(4, True), Scaling("block", 32, -1, FP16, "signed_max")),
    "gguf_q8_0": (IntElement(8, True), Scaling("block", 32, -1, FP16, "amax")),
}

_MX_ELEMENTS = {
    "fp8_e4m3": FloatElement(4, 3, 7, "fn"),
    "fp8_e5m2": FloatElement(5, 2, 15, "ieee"),
    "fp6_e2m3": FloatElement(2, 3, 1, "finite"),
    "fp6_e3m2": FloatElement(3, 2, 3, "finite"),
    "fp4": FloatElement(2, 1, 1, "finite"),
    "fp4_e2m1": FloatElement(2, 1, 1, "finite"),
    "int8": IntElement(8, True, True, 6),
}
_MICROEXPONENT_BITS = {"mx9": 8, "mx6": 5, "mx4": 3}  # element bits: sign + 7, 4, 2 mantissa bits
_SPECIAL_ELEMENTS = {"bf16": BF16, "fp16": FP16, "fp32": FP32, "e8m0": E8M0}
_FNUZ_BIAS = {(4, 3): 8, (5, 2): 16}  # ml_dtypes / torch float8_*fnuz


def _parse_element(s: str):
    if s in _SPECIAL_ELEMENTS:
        return _SPECIAL_ELEMENTS[s]
    m = re.fullmatch(r"(u?)int(n?)(\d+)", s)
    if m:
        return IntElement(int(m.group(3)), signed=not m.group(1), narrow=bool(m.group(2)))
    m = re.fullmatch(r"(?:fp(\d+)_)?e(\d+)m(\d+)(?:b(-?\d+))?(?:_?(fnuz|fn|ieee|finite))?", s)
    if m:
        total, eb, mb = m.group(1), int(m.group(2)), int(m.group(3))
        if total is not None and int(total) != 1 + eb + mb:
            raise ValueError(f"format {s!r}: fp{total} does not match 1 sign + {eb} exponent + {mb} mantissa bits")
        policy = m.group(5)
        if policy is None:
            policy = "fn" if (eb, mb) == (4, 3) else ("ieee" if 1 + eb + mb >= 8 else "finite")
        bias = int(m.group(4)) if m.group(4) is not None else None
        if bias is None and policy == "fnuz":
            bias = _FNUZ_BIAS.get((eb, mb), 2 ** (eb - 1))
        return FloatElement(eb, mb, bias, policy)
    return None


def parse_format(name: str) -> Format:
    """Build a :class:`Format` from a name of the grammar above (``ValueError`` if it does not parse)."""
    s = name.strip().lower()
    if s in _MICROEXPONENT_BITS:  # sign-magnitude m-bit mantissas k·2^−(m−1): symmetric ints with m−1 fraction bits
        bits = _MICROEXPONENT_BITS[s]
        scaling = Scaling("block", 16, -1, E8M0, "floor", sub_block_size=2, sub_offset_bits=1)
        return Format(IntElement(bits, True, True, bits - 2), scaling, name=s)
    m = re.fullmatch(r"mx(.+?)(?:_b(\d+))?", s)
    if m and m.group(1) in _MX_ELEMENTS:
        block = int(m.group(2) or 32)
        return Format(_MX_ELEMENTS[m.group(1)], Scaling("block", block, -1, E8M0, "floor"), name=s)
    if s in _GGUF_GRIDS:
        return Format(*_GGUF_GRIDS[s], name=s)
    if s == "nvfp4":
        return Format(_MX_ELEMENTS["fp4"], Scaling("block", 16, -1, E4M3, "amax", tensor_scale=True), name=s)
    m = re.fullmatch(r"bfp(\d+)_b(\d+)", s)
    if m:
        bits = int(m.group(1))
        elem = IntElement(bits, True, True, bits - 2)
        return Format(elem, Scaling("block", int(m.group(2)), -1, E8M0, "floor"), name=s)
    m = re.fullmatch(r"(.+?)(?:_g(\d+)|_(channel)|_(tensor))?(_zp)?", s)
    elem = _parse_element(m.group(1)) if m else None
    if elem is None:
        raise ValueError(f"unknown format {name!r}{_suggest(s)}")
    zp = bool(m.group(5))
    if m.group(2):
        scaling = Scaling("block", int(m.group(2)), -1, FP16, "amax", zero_point=zp)
    elif m.group(3):
        scaling = Scaling("channel", None, 0, FP32, "amax", zero_point=zp)
    elif m.group(4):
        scaling = Scaling("tensor", None, None, FP32, "amax", zero_point=zp)
    elif zp:
        raise ValueError(f"format {name!r}: a zero point needs a scaling suffix (_g<G>, _channel or _tensor)")
    else:
        scaling = Scaling()
    return Format(elem, scaling, name=s)


def get_format(fmt: FormatLike) -> Format:
    """The :class:`Format` for a name (registered or parsed) or a Format (returned as is)."""
    if isinstance(fmt, Format):
        return fmt
    if not isinstance(fmt, str):
        raise TypeError(f"a format is a name or a numcast Format, got {type(fmt).__name__}")
    key = fmt.strip().lower()
    if key in _REGISTRY:
        return _REGISTRY[key]
    return parse_format(key)


_NAME = re.compile(r"[a-z0-9][a-z0-9_.+-]*")


def register_format(name: str, fmt: Format, *, overwrite: bool = False) -> Format:
    """Add a user format under ``name``; it then joins ``list_formats()`` and the test battery. A name is letters,
    digits and ``_ . + -``; a name the grammar already gives a meaning (``int5_g64``) is refused, since the
    registered format would silently shadow it."""
    if not isinstance(name, str):
        raise TypeError(f"a format name is a string, got {type(name).__name__} {name!r}")
    if not isinstance(fmt, Format):
        raise TypeError(f"register_format needs a numcast Format, got {type(fmt).__name__}")
    key = name.strip().lower()
    if not _NAME.fullmatch(key):
        raise ValueError(f"format name {name!r}: use letters, digits and _ . + - (starting with a letter or digit)")
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"format {name!r} is already registered (pass overwrite=True to replace it)")
    if key not in _REGISTRY:
        try:
            meaning = parse_format(key)
        except ValueError:
            meaning = None
        if meaning is not None:
            raise ValueError(f"format name {name!r} already means {meaning.label} in numcast's name grammar; "
                             "choose a name the grammar does not parse")  # fmt: skip
    fmt = fmt.with_(name=key)
    _REGISTRY[key] = fmt
    return fmt


def list_formats() -> list[Format]:
    """Every registered format, in registry order."""
    return list(_REGISTRY.values())


def _suggest(s: str) -> str:
    close = difflib.get_close_matches(s, list(_REGISTRY), n=5, cutoff=0.5)
    return f"; closest: {', '.join(close)}" if close else f"; see `numcast formats` ({len(_REGISTRY)} formats)"


for _n in _BUILTIN:
    _REGISTRY[_n] = parse_format(_n)
