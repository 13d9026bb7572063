"""A numcast-quantized Hugging Face model as a compressed-tensors checkpoint folder (vLLM, transformers), written
from numcast's own codes and scales, never re-quantized.

The folder: ``config.json`` (the model's transformers config, as ``save_pretrained`` writes it, plus
``quantization_config``), ``model.safetensors`` (every float tensor of the model and, per quantized layer, the
tensors below in place of ``weight``; ``bias`` stays as it is), ``generation_config.json`` when the model
generates, and the tokenizer's files (the source's tokenizer saved, else copied from the folder the model was
loaded from).

Layouts, per quantized ``[out, in]`` weight (numcast's 2-D view; groups run along ``in``). The reader is
PyPI ``compressed-tensors`` 0.20.0; each line names the reader's file under ``compressed_tensors/``:

- ``pack-quantized`` (``compressors/pack_quantized/base.py``, ``helpers.py``): signed 4- or 8-bit integers
  (``int4_g128``, ``int8_channel``, ``int8_g32``, ``mxint8``, ...). ``weight_packed`` int32
  ``[out, ceil(in·b/32)]``: value i of a row at bits ``b·(i mod 32/b)`` of word ``i·b // 32``, stored as
  ``q + 2^(b−1)``; ``weight_shape`` int64 ``[out, in]``; ``weight_scale`` float32 ``[out, in/G]`` (group),
  ``[out, 1]`` (channel) or ``[1]`` (tensor, also for unscaled formats: 1). Unsigned integers with a zero point
  (``uint4_g128_zp``) are written shifted, ``q − 2^(b−1)`` with ``z − 2^(b−1)`` (the same ``q − z``), the zero
  points in ``weight_zero_point``: int32 ``[ceil(out·b/32), in/G]`` packed along ``out`` the same way
  (group, channel), int8 ``[1]`` (tensor). The scale is numcast's scale value times ``2^−frac_bits``
  (MXINT8/BFP elements are fixed point), written only when float32 holds it exactly. float32 rather than
  numcast's FP16 scale format because the reader multiplies in the stored scale's dtype (``_dequantize`` in
  ``quantization/lifecycle/forward_helpers.py``): FP16 storage would round ``q·s`` to 11 bits, FP32 storage
  keeps numcast's values exactly (every FP16 value is an FP32 value).
- ``float-quantized`` (``compressors/naive_quantized/base.py``): FP8 E4M3 elements with FP32 (or FP16/BF16)
  scales per tensor, channel or group (``fp8_e4m3_tensor``, ``fp8_e4m3_channel``): ``weight``
  float8_e4m3fn ``[out, in]`` (numcast's codes), ``weight_scale`` float32 as above.
- ``mxfp8-quantized`` (``compressors/mxfp8/base.py``, ``compressors/mx_utils.py``): ``mxfp8_e4m3``:
  ``weight`` float8_e4m3fn ``[out, in]``, ``weight_scale`` uint8 ``[out, in/32]`` (the E8M0 codes,
  2^(code − 127)).
- ``mxfp4-pack-quantized`` (``compressors/mxfp4/base.py``; ``compressors/nvfp4/helpers.py``
  ``unpack_fp4_from_uint8``): ``mxfp4``: ``weight_packed`` uint8 ``[out, in/2]``, byte j = code 2j (low
  nibble) | code 2j+1 (high nibble), the nibble being the E2M1 code; ``weight_scale`` uint8 ``[out, in/32]``
  (E8M0 codes).
- ``nvfp4-pack-quantized`` (``compressors/nvfp4/base.py``): ``nvfp4``: ``weight_packed`` as MXFP4;
  ``weight_scale`` float8_e4m3fn ``[out, in/16]`` (numcast's E4M3 codes); ``weight_global_scale`` float32 ``[1]``
  = 1 / numcast's FP32 tensor scale, rounded to float32 (the reader decodes ``q · (scale / global_scale)``).
- ``mxfp6-pack-quantized`` (``compressors/mxfp6/base.py``, ``helpers.py``): ``mxfp6_e2m3``: ``weight_packed``
  uint8 ``[out, 3·in/4]``, four 6-bit E2M3 codes per three bytes, little-endian (code k of four at bits
  ``6k``); ``weight_scale`` uint8 ``[out, in/32]`` (E8M0 codes).

What the reader returns (tested): with ``CompressedTensorsConfig(dequantize=True)`` transformers decodes each
weight with the reader's ``decompress`` and casts it to the model's dtype. Integer and FP8 weights come back
equal to ``QTensor.dequantize()`` bit for bit; the MX formats too (the reader decodes them in bfloat16, so a
layer whose values bfloat16 cannot hold, at the edge of E8M0's range, is refused). NVFP4 comes back in
bfloat16 (``unpack_fp4_from_uint8`` decodes to bfloat16 and the reader computes in it): numcast's weight
rounded to bfloat16, up to a one-ulp double rounding through the reader's float32 ``scale / global_scale``.

``config.json``'s ``quantization_config``: one ``config_groups`` entry per distinct scheme, each with its
``format``; a single scheme targets the layer class (``Linear``, ``Embedding``), several target their layers by
name and the top-level ``format`` is ``mixed-precision`` when the formats differ. ``ignore`` lists the model's
Linear and Embedding layers that are written in float: those numcast kept in float (the LM head, embeddings)
and those ``float_fallback`` wrote unquantized. Note: transformers 5's ``dequantize=True`` path decodes every
layer with the first group's scheme (``get_dense_scheme`` in ``transformers/integrations/compressed_tensors.py``),
so transformers reads a mixed-precision folder through compressed-tensors' own per-layer path (the default
``dequantize=False``, decompressed on the first forward; tested), not through ``dequantize=True``. On that path
the FP4/FP6 decoders return bfloat16 weights, which a float32 model's forward refuses (a dtype mismatch in
``F.linear``): a float32 mixed-precision model with MX/NVFP4 layers runs there only loaded in bfloat16 (where
the reader also rounds every scale to bfloat16).

Refused, naming the layer, its format and why (``float_fallback`` writes such a layer as a float ``weight``
instead, listed in ``ignore`` and in :attr:`ExportResult.float_layers`): integers of other widths than 4 and 8
(vLLM's packed-integer kernels take those two; compressed-tensors 0.20 packs other widths densely across words,
older readers did not), unsigned integers without a zero point, FP8 E5M2 and fnuz, MXFP6 E3M2, FP4 with other
block scales, two-level scales other than NVFP4's, channel scales along another axis than ``out``, groups along
``out`` or that do not tile ``in``, a NaN/inf scale (a NaN block), a scale float32 cannot hold, convolution
weights (compressed-tensors compresses Linear and Embedding weights). Weight-only: a model whose layers quantize
their inputs or outputs (``recipe.activations``) is refused as a whole (numcast's activation rounding is not
compressed-tensors' dynamic/static activation scheme), as is a model with numcast's unfused MoE experts (their
checkpoint layout differs from the architecture's) and a model without a transformers ``config``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from numcast.formats.qtensor import QTensor
from numcast.formats.spec import E4M3, E8M0, FloatElement, Format, IntElement, Scaling
from numcast.interop.source import ExportResult, ExportSource, copy_files, quantized_layers
from numcast.io import save_safetensors
from numcast.nn.convert import UnfusedExperts
from numcast.nn.modules import QuantEmbedding, QuantLinear, QuantWeightModule

E2M1 = FloatElement(2, 1, policy="finite")
E2M3 = FloatElement(2, 3, policy="finite")
TARGET = "compressed-tensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja")  # fmt: skip


@dataclass(frozen=True)
class Scheme:
    """One compressed-tensors weight scheme: the checkpoint ``format`` and the weights' QuantizationArgs
    (``compressed_tensors/quantization/quant_args.py``)."""

    format: str
    num_bits: int
    type: str  # "int" | "float"
    strategy: str  # "tensor" | "channel" | "group" | "tensor_group"
    group_size: int | None = None
    symmetric: bool = True
    scale_dtype: str | None = None  # as the reader's presets write it for NVFP4 / MX

    def weights(self) -> dict:
        """The ``weights`` entry of a config group."""
        args = {"num_bits": self.num_bits, "type": self.type, "symmetric": self.symmetric, "strategy": self.strategy,
                "group_size": self.group_size, "dynamic": False, "actorder": None}  # fmt: skip
        if self.scale_dtype is not None:
            args["scale_dtype"] = self.scale_dtype
        return args

    @property
    def label(self) -> str:
        """The stored type, e.g. ``pack-quantized int4 group 128``."""
        size = f" {self.group_size}" if self.group_size else ""
        zp = "" if self.symmetric else " zero-point"
        return f"{self.format} {self.type}{self.num_bits} {self.strategy}{size}{zp}"


# ---- formats -> schemes -------------------------------------------------------------------------------------
def _strategy(sc: Scaling) -> tuple[str | None, str]:
    """compressed-tensors' strategy for numcast's scaling of a ``[out, in]`` weight, or (None, why not)."""
    if sc.granularity in ("none", "tensor"):
        return "tensor", ""
    if sc.granularity == "channel":
        if sc.axis not in (0, -2):
            return None, f"channel scales along axis {sc.axis}; compressed-tensors' channels are output rows (axis 0)"
        return "channel", ""
    if sc.axis not in (-1, 1):
        return None, f"blocks along axis {sc.axis}; compressed-tensors' groups run along the input axis"
    return "group", ""


def ct_scheme(fmt: Format) -> tuple[Scheme | None, str]:
    """(the compressed-tensors scheme storing ``fmt`` exactly, "") or (None, why not) (module docstring)."""
    el, sc = fmt.element, fmt.scaling
    if sc.sub_block_size:
        return None, (f"{fmt.label}: sub-block exponent offsets (shared microexponents) have no compressed-tensors "
                      "scheme")
    strategy, why = _strategy(sc)
    if strategy is None:
        return None, why
    group = sc.block_size if strategy == "group" else None
    if isinstance(el, IntElement):
        return _int_scheme(fmt, strategy, group)
    mx = strategy == "group" and sc.scale_format == E8M0 and sc.block_size == 32 and not sc.tensor_scale
    if el == E2M1 and strategy == "group" and sc.block_size == 16 and sc.scale_format == E4M3 and sc.tensor_scale:
        return Scheme("nvfp4-pack-quantized", 4, "float", "tensor_group", 16, scale_dtype="torch.float8_e4m3fn"), ""
    if el == E2M1 and mx:
        return Scheme("mxfp4-pack-quantized", 4, "float", "group", 32, scale_dtype="torch.uint8"), ""
    if el == E2M3 and mx:
        return Scheme("mxfp6-pack-quantized", 6, "float", "group", 32, scale_dtype="torch.uint8"), ""
    if el == E4M3 and mx:
        return Scheme("mxfp8-quantized", 8, "float", "group", 32, scale_dtype="torch.uint8"), ""
    if el == E4M3 and not sc.tensor_scale:
        return Scheme("float-quantized", 8, "float", strategy, group), ""
    return None, (f"{fmt.label} has no compressed-tensors scheme (it stores 4/8-bit integers, FP8 E4M3 with float "
                  "scales, MXFP8 E4M3, MXFP6 E2M3, MXFP4 and NVFP4)")  # fmt: skip


def _int_scheme(fmt: Format, strategy: str, group: int | None) -> tuple[Scheme | None, str]:
    el, sc = fmt.element, fmt.scaling
    if el.bits not in (4, 8):
        return None, (f"{el.bits}-bit integers: compressed-tensors' pack-quantized checkpoints hold 4- or 8-bit "
                      "integers for vLLM's kernels (other widths pack differently across reader versions)")  # fmt: skip
    if sc.tensor_scale:
        return None, "two-level (tensor × group) integer scales have no compressed-tensors scheme"
    if not el.signed and not sc.zero_point:
        return None, "unsigned integers without a zero point: pack-quantized integers are signed or asymmetric"
    return Scheme("pack-quantized", el.bits, "int", strategy, group, symmetric=el.signed), ""


# ---- one layer ------------------------------------------------------------------------------------------------
def _signed_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Two's complement ``bits``-bit codes → their int64 values."""
    c = codes.to(torch.int64)
    return torch.where(c >= 1 << (bits - 1), c - (1 << bits), c)


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """``[rows, n]`` integers in [−2^(b−1), 2^(b−1)) → ``[rows, ceil(n·b/32)]`` int32 words: value i stored as
    ``value + 2^(b−1)`` at bits ``b·(i mod 32/b)`` of word ``i·b // 32`` (``pack_to_int32``; b = 4 or 8, so no
    value straddles two words); the last word is padded with zero bits."""
    rows, n = values.shape
    per = 32 // bits
    words = -(-n // per)
    u = F.pad(values.to(torch.int64) + (1 << (bits - 1)), (0, words * per - n))
    w = (u.reshape(rows, words, per) << (bits * torch.arange(per, dtype=torch.int64))).sum(-1)
    return torch.where(w >= 1 << 31, w - (1 << 32), w).to(torch.int32)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` E2M1 codes → ``[out, in/2]`` uint8: code 2j in the low nibble, 2j+1 in the high one."""
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def pack_fp6(codes: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` 6-bit codes → ``[out, 3·in/4]`` uint8: four codes per three bytes, little-endian."""
    out, n = codes.shape
    c = codes.to(torch.int64).reshape(out, n // 4, 4)
    word = c[..., 0] | (c[..., 1] << 6) | (c[..., 2] << 12) | (c[..., 3] << 18)
    return torch.stack([word & 0xFF, (word >> 8) & 0xFF, word >> 16], dim=-1).to(torch.uint8).reshape(out, -1)


def _scale_shape(qt: QTensor, strategy: str) -> tuple[int, ...]:
    out, n_in = qt.shape
    if strategy == "tensor":
        return (1,)
    if strategy == "channel":
        return (out, 1)
    return (out, n_in // qt.format.block_size)


def _float_scale(qt: QTensor, strategy: str) -> torch.Tensor:
    """numcast's scale values (times 2^−frac_bits for fixed-point elements) as float32, in the strategy's shape;
    ``ValueError`` when float32 does not hold them exactly."""
    s = qt.scales()
    s = torch.ones(1, dtype=torch.float64) if s is None else s.reshape(-1)
    s = s * 2.0 ** -getattr(qt.format.element, "frac_bits", 0)
    s32 = s.float()
    if not bool(torch.equal(s32.double(), s)):
        raise ValueError("a scale is out of float32's range (compressed-tensors stores these scales as float32)")
    return s32.reshape(_scale_shape(qt, strategy))


def _zero_point(qt: QTensor, scheme: Scheme) -> torch.Tensor:
    """numcast's zero points shifted by −2^(b−1), packed along ``out`` (group, channel) or int8 ``[1]``."""
    zp = qt.zero_point.to(torch.int64) - (1 << (scheme.num_bits - 1))
    if scheme.strategy == "tensor":
        return zp.reshape(1).to(torch.int8)
    return pack_int32(zp.reshape(_scale_shape(qt, scheme.strategy)).t(), scheme.num_bits).t().contiguous()


def _check_layer(qt: QTensor, scheme: Scheme) -> None:
    """The layer-level conditions (shape, whole groups, finite scales); ``ValueError`` saying which fails."""
    if len(qt.shape) != 2:
        raise ValueError(f"weight view of shape {qt.shape} is not 2-D")
    if scheme.group_size and qt.shape[1] % scheme.group_size:
        raise ValueError(f"{qt.shape[1]} inputs are not whole groups of {scheme.group_size} (compressed-tensors "
                         "groups must tile the input axis)")  # fmt: skip
    scales = qt.scales()
    if scales is not None and not bool(torch.isfinite(scales).all()):
        raise ValueError("a block holds NaN/inf (NaN scale); compressed-tensors has no code for it")


def compress_qtensor(qt: QTensor, scheme: Scheme) -> dict[str, torch.Tensor]:
    """The compressed tensors of one ``[out, in]`` QTensor under ``scheme``, by local name (``weight_packed``,
    ``weight_scale``, ...; module docstring); ``ValueError`` when the layer cannot be stored exactly."""
    _check_layer(qt, scheme)
    out, n_in = qt.shape
    if scheme.format == "pack-quantized":
        q = qt.codes.to(torch.int64)
        q = _signed_codes(q, scheme.num_bits) if scheme.symmetric else q - (1 << (scheme.num_bits - 1))
        t = {"weight_packed": pack_int32(q, scheme.num_bits), "weight_scale": _float_scale(qt, scheme.strategy),
             "weight_shape": torch.tensor([out, n_in], dtype=torch.int64)}  # fmt: skip
        if not scheme.symmetric:
            t["weight_zero_point"] = _zero_point(qt, scheme)
        return t
    if scheme.format == "float-quantized":
        return {"weight": qt.codes.to(torch.uint8).view(torch.float8_e4m3fn),
                "weight_scale": _float_scale(qt, scheme.strategy)}  # fmt: skip
    e_scale = qt.scale_codes.to(torch.uint8).reshape(out, -1)
    if scheme.format == "mxfp8-quantized":
        return {"weight": qt.codes.to(torch.uint8).view(torch.float8_e4m3fn), "weight_scale": e_scale}
    if scheme.format == "mxfp6-pack-quantized":
        return {"weight_packed": pack_fp6(qt.codes), "weight_scale": e_scale}
    if scheme.format == "mxfp4-pack-quantized":
        return {"weight_packed": pack_fp4(qt.codes), "weight_scale": e_scale}
    return {"weight_packed": pack_fp4(qt.codes), "weight_scale": e_scale.view(torch.float8_e4m3fn),
            "weight_global_scale": torch.tensor([1.0 / qt.tensor_scale], dtype=torch.float32)}  # fmt: skip


def _reader_holds(module: QuantWeightModule, scheme: Scheme) -> None:
    """The MX decoders compute in bfloat16 (``compressors/mx_utils.py``): refuse a layer whose values bfloat16
    cannot hold (E8M0 scales at the edge of the range), which the reader would change."""
    if scheme.format not in ("mxfp4-pack-quantized", "mxfp6-pack-quantized", "mxfp8-quantized"):
        return
    w = module.weight.detach()
    bad = int((w.to(torch.bfloat16).to(w.dtype) != w).sum())
    if bad:
        raise ValueError(f"{bad} values are not bfloat16 numbers (E8M0 scales at the edge of the range) and "
                         "compressed-tensors decodes MX formats in bfloat16")  # fmt: skip


def compress_layer(module: QuantWeightModule) -> tuple[Scheme, dict[str, torch.Tensor]]:
    """The scheme and compressed tensors of one quantized layer; ``ValueError`` saying why compressed-tensors
    cannot store it exactly (the caller names the layer and its format)."""
    if not isinstance(module, (QuantLinear, QuantEmbedding)):
        raise ValueError(f"{type(module).__name__}: compressed-tensors compresses Linear and Embedding weights")
    scheme, why = ct_scheme(module.qweight.format)
    if scheme is None:
        raise ValueError(why)
    _reader_holds(module, scheme)
    return scheme, compress_qtensor(module.qweight, scheme)


# ---- the model ------------------------------------------------------------------------------------------------
def _check_model(source: ExportSource) -> None:
    """Refuse what this exporter cannot write faithfully at all (module docstring)."""
    model = source.model
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(config, "save_pretrained", None)):
        raise ValueError(f"{type(model).__name__} has no Hugging Face transformers config (.config): a "
                         "compressed-tensors checkpoint is a transformers folder (config.json with the "
                         "architecture + model.safetensors); export a transformers model, or use the gguf / qonnx "
                         "targets")  # fmt: skip
    acts = [n for n, m in model.named_modules() if isinstance(m, QuantWeightModule)
            and (m.input_quant is not None or m.output_quant is not None)]  # fmt: skip
    recipe_acts = getattr(source.recipe, "activations", None)
    if acts or recipe_acts:
        what = f"activations={recipe_acts!r}" if recipe_acts else "quantized activations"
        shown = ", ".join(acts[:3]) + (", ..." if len(acts) > 3 else "")
        raise ValueError(f"the model quantizes layer inputs ({what}{'; ' + shown if shown else ''}): the "
                         "compressed-tensors export writes weight-only schemes, and numcast's activation rounding is "
                         "not compressed-tensors' activation scheme; export a weight-only quantization")  # fmt: skip
    moe = [n for n, m in model.named_modules() if isinstance(m, UnfusedExperts)]
    if moe:
        raise ValueError(f"{moe[0]}: numcast unfused these MoE experts into per-expert Linear layers, whose names "
                         "the architecture's checkpoint layout does not have; compressed-tensors export of MoE models "
                         "is not supported yet")  # fmt: skip


def _layer_tensors(name: str, module: QuantWeightModule, compressed: dict[str, torch.Tensor] | None):
    """A quantized layer's tensors by full name: the compressed ones, or its dequantized ``weight`` when
    ``compressed`` is None (float fallback); its bias either way."""
    out = {f"{name}.{k}": v for k, v in (compressed or {"weight": module.weight.detach()}).items()}
    bias = getattr(module, "bias", None)
    if bias is not None:
        out[f"{name}.bias"] = bias.detach()
    return out


def _untie(state: dict[str, torch.Tensor], model: nn.Module) -> bool:
    """Drop the tied copies transformers re-ties on load (``save_pretrained`` does the same: safetensors stores no
    aliases); clone any other alias. Returns whether a declared tie no longer holds (numcast quantized one side),
    so the written config must say ``tie_word_embeddings: false``."""
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    broken = False
    for target, src in tied.items():
        a, b = state.get(target), state.get(src)
        if a is not None and b is not None and _same_storage(a, b) and a.shape == b.shape:
            del state[target]
        else:
            broken = True
    seen: set[int] = set()
    for k, t in state.items():
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            state[k] = t.clone()
        seen.add(ptr)
    return broken


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.storage_offset() == b.storage_offset()


def quantization_config(schemes: dict[str, Scheme], ignore: list[str], modules: dict[str, nn.Module]) -> dict:
    """``config.json``'s ``quantization_config`` for layers ``schemes`` (name → scheme, model order)."""
    by_scheme: dict[Scheme, list[str]] = {}
    for name, s in schemes.items():
        by_scheme.setdefault(s, []).append(name)
    groups = {}
    for i, (s, names) in enumerate(by_scheme.items()):
        if len(by_scheme) == 1:
            targets = sorted({"Embedding" if isinstance(modules[n], QuantEmbedding) else "Linear" for n in names})
        else:
            targets = names
        groups[f"group_{i}"] = {"targets": targets, "weights": s.weights(), "input_activations": None,
                                "output_activations": None, "format": s.format}  # fmt: skip
    formats = {s.format for s in by_scheme}
    return {"quant_method": "compressed-tensors", "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed", "config_groups": groups, "ignore": ignore,
            "kv_cache_scheme": None, "global_compression_ratio": None}  # fmt: skip


def _float_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _write_config(model: nn.Module, path: Path, qconfig: dict, untied: bool) -> None:
    """config.json as ``save_pretrained`` writes it (``dtype``, ``architectures``), plus ``quantization_config``."""
    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.dtype = str(_float_dtype(model)).removeprefix("torch.")
    cfg.architectures = [type(model).__name__]
    if untied:
        cfg.tie_word_embeddings = False
    cfg.save_pretrained(path)
    data = json.loads((path / "config.json").read_text())
    data["quantization_config"] = qconfig
    (path / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_extras(source: ExportSource, path: Path) -> None:
    """generation_config.json (models that generate) and the tokenizer's files (saved from the source's
    tokenizer, else copied from the folder the model was loaded from)."""
    model = source.model
    gen = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", None)
    if gen is not None and callable(can_generate) and can_generate():
        gen.save_pretrained(path)
    if source.tokenizer is not None:
        source.tokenizer.save_pretrained(path)
    elif source.hf_folder is not None:
        copy_files(Path(source.hf_folder), path, TOKENIZER_FILES)


def _compress_layers(layers: dict[str, QuantWeightModule], float_fallback: bool, result: ExportResult):
    """(name → scheme of the layers written quantized, every quantized layer's tensors by full name); a layer
    the target cannot store raises, or with ``float_fallback`` is written as float and noted in ``result``."""
    schemes: dict[str, Scheme] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, module in layers.items():
        try:
            scheme, compressed = compress_layer(module)
        except ValueError as exc:
            why = f"{module.qweight.format.label}: {exc}"
            if not float_fallback:
                raise ValueError(f"{name} ({why}); pass float_fallback (--float-fallback) to write it unquantized "
                                 "(listed in the config's ignore)") from None  # fmt: skip
            result.float_layers[name] = why
            compressed = None
        else:
            schemes[name] = scheme
        tensors.update(_layer_tensors(name, module, compressed))
    if not schemes:
        raise ValueError(f"none of the {len(layers)} quantized layers can be written quantized: the export would "
                         "hold a float model")  # fmt: skip
    return schemes, tensors


def _state_dict(model: nn.Module, layers: dict[str, QuantWeightModule], layer_tensors: dict[str, torch.Tensor]):
    """The checkpoint: the model's float tensors (numcast's own entries of the quantized layers replaced by
    ``layer_tensors``), contiguous, tied copies dropped; and whether a declared tie no longer holds."""
    prefixes = tuple(f"{n}." for n in layers)
    state = {k: v.detach() for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    state.update(layer_tensors)
    state = {k: v.contiguous() for k, v in state.items()}
    return state, _untie(state, model)


def write_compressed_tensors(source: ExportSource, path: Path, float_fallback: bool) -> ExportResult:
    """Write ``source`` (a numcast-quantized transformers model) as a compressed-tensors folder at ``path``
    (module docstring). A layer compressed-tensors cannot store exactly raises ``ValueError`` naming it, its
    format and why; with ``float_fallback`` it is written as its dequantized float weight, listed in the config's
    ``ignore`` and in the result's ``float_layers``. Weight-only: activation quantization is refused."""
    _check_model(source)
    model = source.model
    layers = quantized_layers(model)
    result = ExportResult(path, TARGET)
    schemes, layer_tensors = _compress_layers(layers, float_fallback, result)
    result.layers = {n: s.label for n, s in schemes.items()}
    state, untied = _state_dict(model, layers, layer_tensors)
    modules = dict(model.named_modules())
    ignore = [n for n, m in modules.items() if n in result.float_layers
              or (isinstance(m, (nn.Linear, nn.Embedding)) and not isinstance(m, QuantWeightModule))]  # fmt: skip
    _write_config(model, path, quantization_config(schemes, ignore, modules), untied)
    save_safetensors(state, path / "model.safetensors", {"format": "pt"})
    _write_extras(source, path)
    return result
