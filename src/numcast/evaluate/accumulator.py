"""Per-layer accumulator analysis of a quantized model (the model-level use of :mod:`numcast.accumulator`, which
stays pure integer math): the bits each layer needs (exact, A2Q rule, A2Q+ rule,
data-type bound) and the overflow events a P-bit accumulator would see, on real calibration inputs and on
adversarial ones (``numcast accumulator``).

A layer is analysed when its weights are integers with one scale per output channel or per tensor (its dot
products are then integer sums). Its integer inputs come from its own input quantizer when that is an integer
per-tensor format (N and sign from the format, x_int = x / scale); otherwise from ``input_bits``: a per-tensor
symmetric scale amax/qmax measured on the same calibration inputs, unsigned when those inputs are never
negative. Real inputs are simulated in ``mode`` (wrap by default), in sequential order, on at most
``max_rows`` input rows per layer (an even stride over the rows; dot products = rows × output channels).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn.utils import skip_init

from numcast.accumulator.bounds import as_int64, datatype_bound_bits, min_accumulator_bits
from numcast.accumulator.codes import integer_codes, integer_sum_reason
from numcast.accumulator.simulate import accumulate, adversarial_inputs
from numcast.formats.qtensor import QTensor
from numcast.nn.observe import call_model, layer_inputs_2d, observe_inputs


@dataclass
class LayerAccumulator:
    """One row of the analysis (bits are the max over the layer's output channels)."""

    name: str
    K: int
    weight_bits: int
    input: str  # "uint8" / "int4"
    input_from: str  # "layer quantizer" or "--input-bits"
    exact_bits: int
    a2q_bits: int
    a2q_plus_bits: int
    datatype_bits: int
    dot_products: int  # simulated on real inputs
    overflows_real: int  # overflow events on real inputs at P
    dot_products_overflowing: int  # real dot products whose final value is wrong (wrap) or clipped
    channels_overflowing_adversarial: int  # output channels whose worst-case input overflows at P
    channels: int
    tile_bits_needed: int | None = None  # exact bits of the per-tile register (tiled analysis only)


def _integer_input_quantizer(module: nn.Module):
    """The layer's own static integer input quantizer, or None."""
    q = getattr(module, "input_quant", None)
    if q is not None and q.mode == "static" and q.fmt.element.kind == "int" and not q.fmt.element.frac_bits:
        return q
    return None


def _layer_input_spec(module: nn.Module, input_bits: int, observed_min: float) -> tuple[int, bool, str]:
    q = _integer_input_quantizer(module)
    if q is not None:
        return q.fmt.element.bits, q.fmt.element.signed, "layer quantizer"
    return input_bits, observed_min < 0, "--input-bits"


def _to_int(x: torch.Tensor, module: nn.Module, bits: int, signed: bool, amax: float) -> torch.Tensor:
    """Integer input codes: the layer's own static integer quantizer when it has one, else a symmetric
    per-tensor scale amax/qmax of ``bits`` (round half to even)."""
    q = _integer_input_quantizer(module)
    if q is not None:
        return torch.round(q(x).double() / float(q.scales_for(float(q.amax)).effective()))
    qmax = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
    lo = -(1 << (bits - 1)) if signed else 0
    scale = amax / qmax if amax > 0 else 1.0
    return torch.round(x.double() / scale).clamp(lo, qmax)


@torch.no_grad()
def analyze_model(model: nn.Module, batches: list, input_bits: int, accumulator_bits: int, *, mode: str = "wrap",
                  max_rows: int = 4096, call=None, tile: int | None = None,
                  tile_bits: int | None = None) -> tuple[list[LayerAccumulator], list[tuple[str, str]]]:  # fmt: skip
    """(rows for analysed layers, (name, reason) for quantized layers that were not) — see module docstring.

    ``call(model, batch)`` runs one batch (default: ``model(batch)``). ``tile``/``tile_bits``: two-stage
    accumulation (tiles of ``tile`` inputs in ``tile_bits``-bit registers, their sum in the P-bit one); rows
    then also give the per-tile bits needed (exact) and the simulation counts both stages' overflows."""
    call = call or call_model
    layers, skipped = {}, []
    for name, m in model.named_modules():
        qt = getattr(m, "qweight", None)
        if not isinstance(qt, QTensor) or isinstance(m, nn.Embedding) or not hasattr(m, "input_quant"):
            continue
        why = integer_sum_reason(qt.format)
        if why:
            skipped.append((name, why))
        else:
            layers[name] = m
    stats = observe_inputs(layers, lambda: [call(model, b) for b in batches], keep=True)
    rows = []
    for n, m in layers.items():
        bits, signed, source = _layer_input_spec(m, input_bits, stats[n].low)
        q = integer_codes(m.qweight).long()
        out, K = q.shape
        groups = getattr(m, "groups", 1)
        real_events = dot = wrong = 0
        per_group_out = out // groups
        x_int = _to_int(torch.cat(stats[n].seen), m, bits, signed, stats[n].amax)
        stats[n].seen.clear()
        grows = conv_input_rows(x_int, _geometry(m))  # [groups, rows, K]
        for gi in range(groups):
            r = grows[gi]
            if r.shape[0] > max_rows:
                r = r[:: -(-r.shape[0] // max_rows)]
            qg = q[gi * per_group_out : (gi + 1) * per_group_out]
            res = accumulate(r, qg, accumulator_bits, mode, tile=tile, tile_bits=tile_bits)
            real_events += int(res.overflows.sum())
            dot += res.y.numel()
            wrong += int((res.y != res.exact).sum())
        adv = torch.zeros(out, dtype=torch.int64)
        for s in (1, -1):
            x_adv = adversarial_inputs(q, bits, signed, s)
            adv += accumulate(x_adv, q, accumulator_bits, mode, paired=True, tile=tile, tile_bits=tile_bits).overflows
        rows.append(
            LayerAccumulator(
                name=n,
                K=K,
                weight_bits=m.qweight.format.element.bits,
                input=f"{'int' if signed else 'uint'}{bits}",
                input_from=source,
                exact_bits=int(min_accumulator_bits(q, bits, signed, "exact").max()),
                a2q_bits=int(min_accumulator_bits(q, bits, signed, "a2q").max()),
                a2q_plus_bits=int(min_accumulator_bits(q, bits, signed, "a2q+").max()),
                datatype_bits=datatype_bound_bits(K, bits, signed, m.qweight.format.element.bits),
                dot_products=dot,
                overflows_real=real_events,
                dot_products_overflowing=wrong,
                channels_overflowing_adversarial=int((adv > 0).sum()),
                channels=out,
                tile_bits_needed=None if tile is None else int(min_accumulator_bits(q, bits, signed, tile=tile).max()),
            )  # fmt: skip
        )
    return rows, skipped


def conv_input_rows(x_int: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """Integer conv/linear inputs as the rows a layer's dot products read: ``[groups, rows, K]`` int64, columns
    in the order of the weight view ``[out, in/groups·Πk]`` (zero padding is exact: it adds 0-terms)."""
    rows = layer_inputs_2d(module, as_int64(x_int, "x_int").to(torch.float64))
    return rows.round().to(torch.int64)


def _geometry(m: nn.Module) -> nn.Module:
    """A float module with ``m``'s geometry, for :func:`conv_input_rows`."""
    if not hasattr(m, "kernel_size"):
        return skip_init(nn.Linear, 1, 1)  # skip_init: the global RNG stays untouched
    cls = nn.Conv2d if len(m.kernel_size) == 2 else nn.Conv1d
    conv = skip_init(cls, m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                     bias=False)  # fmt: skip
    if getattr(m, "static_padding", None) is not None:
        conv.static_padding = m.static_padding
    return conv


def rows_to_records(rows: list[LayerAccumulator]) -> list[dict]:
    return [asdict(r) for r in rows]
