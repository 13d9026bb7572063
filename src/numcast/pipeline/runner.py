"""Sequential, layer-wise calibration (the GPTQ pattern) with two activation streams.

1. Capture the inputs of the first block for every calibration batch (a pre-hook on the block records its
   arguments and stops the forward), once on the float model (float stream X) and once after the layers
   outside the blocks were quantized (quantized stream X̂; the same tensors when nothing before the first
   block changed).
2. For each block in order: find its quantizable layers in execution order; for each layer (``true
   sequential``) run the block on X̂ with a hook that feeds the layer's inputs to the method's accumulator
   (and, for methods that diffuse error, the float block on X in lock step for the float inputs), solve,
   and swap in the quantized module; then advance both streams through the block: X̂ ← block(X̂) with the
   quantized layers, X ← float block(X). Per-layer output SQNR is measured during that advance: each
   quantized layer's output against its float twin's output on the same input.
   Methods that diffuse error may also re-fit the float weights of layers kept in float inside the blocks
   (Error Diffusion's layer calibration, ``calibrate_float_layers``), in the same sequence.
3. Layers outside the blocks (embeddings, LM head, pooler, ...) take RTN. Static activation scales are
   calibrated block by block on the quantized stream once the block's weights are solved (until then the
   block's input quantizers pass inputs through), so later blocks see quantized activations; those of layers
   outside the blocks on the finished model.

Only the block being solved is on the compute device (``Placement``); finished blocks, the float copy and
the streams stay on the CPU, so peak memory is about the model plus one block's activations of the two
streams. ``Placement`` is the one place that moves things, so a distributed runner can replace it.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from numcast.formats.registry import get_format
from numcast.nn.act_quant import ActQuantizer, calibrate
from numcast.nn.observe import call_model
from numcast.nn.surgery import set_module
from numcast.pipeline.methods import method_for
from numcast.pipeline.quantize_model import (
    LayerPlan,
    QuantizationResult,
    calibrate_activations,
    finish_qweight,
    make_quant_module,
    plan_layers,
    prepare_plans,
)
from numcast.pipeline.recipe import Recipe


def _move(obj, device: torch.device | str):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_move(o, device) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


@dataclass
class Placement:
    """Where a block computes; everything else is offloaded to the CPU."""

    device: torch.device | str = "cpu"

    def compute(self, obj):
        return obj.to(self.device) if isinstance(obj, nn.Module) else _move(obj, self.device)

    def offload(self, obj):
        return obj.to("cpu") if isinstance(obj, nn.Module) else _move(obj, "cpu")


class _Stop(Exception):
    pass


@dataclass
class BlockCall:
    """The arguments one calibration batch passes to a block (the stream tensor is ``args[0]`` or
    ``kwargs['hidden_states']``)."""

    args: tuple
    kwargs: dict

    @property
    def x(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def with_x(self, x: torch.Tensor) -> tuple[tuple, dict]:
        if self.args:
            return (x,) + tuple(self.args[1:]), self.kwargs
        return (), {**self.kwargs, "hidden_states": x}


def capture_block_inputs(model: nn.Module, block: nn.Module, batches: list, placement: Placement) -> list[BlockCall]:
    """The arguments ``block`` receives for each batch (the model's forward is stopped there)."""
    calls: list[BlockCall] = []

    def hook(_mod, args, kwargs):
        calls.append(BlockCall(placement.offload(tuple(args)), placement.offload(dict(kwargs))))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for b in batches:
                try:
                    call_model(model, placement.compute(b))
                except _Stop:
                    pass
    finally:
        handle.remove()
    if len(calls) != len(batches):
        raise RuntimeError(f"the first block was reached by {len(calls)} of {len(batches)} calibration batches")
    return calls


def _without_x(calls: list[BlockCall]) -> list[BlockCall]:
    """The calls with their stream tensor dropped (the runner keeps the streams apart; ``with_x`` puts it back)."""
    out = []
    for c in calls:
        if c.args:
            out.append(BlockCall((None,) + tuple(c.args[1:]), c.kwargs))
        else:
            out.append(BlockCall((), {**c.kwargs, "hidden_states": None}))
    return out


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _run_block(block: nn.Module, call: BlockCall, x: torch.Tensor, placement: Placement) -> torch.Tensor:
    args, kwargs = call.with_x(x)
    return _first(block(*placement.compute(args), **placement.compute(kwargs)))


def _execution_order(block: nn.Module, modules: list[nn.Module], call: BlockCall, x, placement):
    """(modules in the order the block calls them, {id(module): id of the input tensor it read})."""
    seen: list[nn.Module] = []
    read: dict[int, int] = {}
    alive: list = []  # keeps every input alive during the pass, so no two inputs can share an id

    def hook(mod, args):
        if mod not in seen:
            seen.append(mod)
            read[id(mod)] = id(args[0])
            alive.append(args[0])

    hooks = [m.register_forward_pre_hook(hook) for m in modules]
    try:
        with torch.no_grad():
            _run_block(block, call, x, placement)
    finally:
        for h in hooks:
            h.remove()
    return seen + [m for m in modules if m not in seen], read


def _sequential_groups(plans: list, read: dict[int, int], share_inputs: bool) -> list[list]:
    """One group per layer in execution order; with ``share_inputs``, consecutive layers that read the very same
    input tensor (q/k/v, gate/up) form one group: quantizing one of them cannot change the others' input, so the
    result is the same as one at a time, with one calibration pass instead of several."""
    groups: list[list] = []
    for p in plans:
        key = read.get(id(p.module))
        if share_inputs and groups and key is not None and read.get(id(groups[-1][-1].module)) == key:
            groups[-1].append(p)
        else:
            groups.append([p])
    return groups


def quantize_blockwise(
    model: nn.Module,
    blocks: list[nn.Module],
    calibration: Iterable,
    recipe: Recipe,
    *,
    placement: Placement | None = None,
    true_sequential: bool = True,
    progress: bool = True,
    first_block_input: str = "capture",
    share_inputs: bool = True,
) -> QuantizationResult:
    """Quantize ``model`` in place, block by block (see module docstring).

    ``blocks`` are the model's sequential blocks (decoder layers, encoder layers, CNN stages) in execution
    order; ``calibration`` is a list of model inputs (tensors, tuples or dicts of keyword arguments).
    ``first_block_input="model"`` says the calibration tensors are the first block's inputs themselves (a
    CNN stem that is a view over the model's modules, which the model's own forward never calls).
    ``true_sequential`` solves each layer on inputs produced by the already quantized layers before it
    (``share_inputs`` groups layers reading one tensor, see :func:`_sequential_groups`); otherwise all layers
    of a block are solved from one pass.
    """
    placement = placement or Placement()
    batches = list(calibration)
    if not batches:
        raise ValueError("the calibration set is empty: block-wise quantization needs calibration batches")
    if not blocks:
        raise ValueError("no blocks to quantize")
    t0 = time.perf_counter()
    method = method_for(recipe)
    method.progress = progress
    model.eval()
    todo, report = plan_layers(model, recipe)
    recipe = prepare_plans(model, todo, report, recipe, batches)
    by_id = {id(p.module): p for p in todo}
    in_blocks = {id(m) for b in blocks for m in b.modules()}
    refit = _float_layers_to_refit(model, recipe, report, in_blocks) if method.refits_float_layers(recipe) else []
    by_id.update({id(p.module): p for p in refit})
    refit_ids = {id(p.module) for p in refit}
    entry = {r.name: r for r in report}

    if first_block_input not in ("capture", "model"):
        raise ValueError(f"first_block_input must be 'capture' or 'model', got {first_block_input!r}")

    def first_inputs() -> list[BlockCall]:
        if first_block_input == "model":
            return [BlockCall((b,), {}) for b in batches]
        return capture_block_inputs(model, blocks[0], batches, placement)

    float_calls = first_inputs()
    outside = [p for p in todo if id(p.module) not in in_blocks]
    for p in outside:
        qt = finish_qweight(p, recipe, None, entry[p.name])
        new = make_quant_module(p, recipe, qweight=qt, defer_static=True)  # calibrated on the finished model
        set_module(model, p.name, new)
        entry[p.name].method = "rtn (outside blocks)"
    outside_done = bool(outside)
    del todo, outside  # from here on a layer's float original lives only until its block is done
    quant_calls = first_inputs() if outside_done else float_calls
    xs_q = [c.x for c in quant_calls]
    xs_f = [c.x for c in float_calls] if method.needs_float_inputs else []  # the float stream, when used
    quant_calls, float_calls = _without_x(quant_calls), _without_x(float_calls)  # the streams hold x now

    bar = tqdm(blocks, desc=f"{method.name} blocks", disable=not progress, leave=False)
    for block in bar:
        names = {id(m): n for n, m in block.named_modules()}
        plans = [by_id[id(m)] for m in block.modules() if id(m) in by_id]
        if not plans:
            xs_q, xs_f = _advance(block, None, quant_calls, xs_q, xs_f, {}, placement, method.needs_float_inputs)
            continue
        fblock = copy.deepcopy(block)
        ftwin = {id(p.module): fblock.get_submodule(names[id(p.module)]) for p in plans}
        block = placement.compute(block)
        fblock = placement.compute(fblock)
        order, read = _execution_order(block, [p.module for p in plans], quant_calls[0], xs_q[0], placement)
        plans.sort(key=lambda p, o=order: o.index(p.module))
        groups = _sequential_groups(plans, read, share_inputs) if true_sequential else [plans]
        qmods: dict[int, tuple[str, nn.Module]] = {}  # id(quantized module) -> (name, float twin)
        pre = _solve_block(method, block, fblock, plans, names, refit_ids, quant_calls, xs_q, xs_f, placement)
        for group in groups:
            accs = {}
            if method.needs_inputs:
                accs = _accumulate(block, fblock, group, ftwin, quant_calls, float_calls, xs_q, xs_f, method, placement,
                                   shared=true_sequential and share_inputs)  # fmt: skip
            for p in group:
                if id(p.module) in refit_ids:  # kept in float: its float weights absorb the upstream error
                    method.refit_float(p.module, accs[id(p.module)])
                    entry[p.name].method = f"{method.name} (float weights re-fit)"
                    continue
                qt = pre.get(id(p.module)) or method.solve(
                    p.module, get_format(p.weight_format), accs.get(id(p.module))
                )
                qt = finish_qweight(p, recipe, qt, entry[p.name])
                # static input scales are calibrated once the block is done (below)
                new = placement.compute(make_quant_module(p, recipe, qweight=qt, defer_static=True))
                set_module(model, p.name, new)  # the model's forward sees it ...
                if names[id(p.module)]:
                    set_module(block, names[id(p.module)], new)  # ... and so does a block that is a view of it
                else:
                    block = new  # the block is this layer itself
                qmods[id(new)] = (p.name, ftwin[id(p.module)])
                entry[p.name].method = method.name
        _calibrate_block_inputs(block, quant_calls, xs_q, placement)
        stats = {k: [0.0, 0.0] for k in qmods}
        need_f = method.needs_float_inputs
        xs_q, xs_f = _advance(block, fblock, quant_calls, xs_q, xs_f, qmods, placement, need_f, stats)
        for k, (sig, noise) in stats.items():
            entry[qmods[k][0]].sqnr_db = 10 * math.log10(sig / noise) if noise > 0 and sig > 0 else math.inf
        placement.offload(block)
        for p in plans:  # the float originals are not needed any more: let them go (memory ~ one model)
            by_id.pop(id(p.module), None)
        del fblock, ftwin, plans, groups, group, order, read, qmods, accs
    if recipe.activations is not None and recipe.activation_mode == "static":
        calibrate_activations(model, batches, only_uncalibrated=True)  # layers outside the blocks
    for r in report:
        if r.action == "quantized" and r.method is None:
            r.method = method.name
    return QuantizationResult(model, report, wall_time_s=time.perf_counter() - t0, recipe=recipe)


def _float_layers_to_refit(model, recipe, report, in_blocks) -> list[LayerPlan]:
    """Linear/conv layers inside the blocks that the recipe keeps in float (excluded, skipped by override)."""
    skipped = {r.name for r in report if r.action == "skipped"}
    out = []
    for name, m in model.named_modules():
        if name in skipped and id(m) in in_blocks and isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            out.append(LayerPlan(name, m, type(m), "", None))
    return out


def _accumulate(block, fblock, group, ftwin, quant_calls, float_calls, xs_q, xs_f, method, placement,
                shared: bool = False) -> dict:  # fmt: skip
    """Feed the group's layer inputs of every calibration batch to the method's accumulators. Each pass stops
    as soon as the group's last layer (in execution order) has read its input: the rest of the block cannot
    change what the group sees. ``shared``: the group's layers read one tensor; Linear layers then share one
    accumulator (the same statistics, computed once)."""
    one = shared and all(isinstance(p.module, nn.Linear) for p in group)
    accs = {id(p.module): method.accumulator(p.module) for p in (group[:1] if one else group)}
    if one:
        accs.update({id(p.module): accs[id(group[0].module)] for p in group})
    feeds = {id(group[0].module)} if one else {id(p.module) for p in group}  # layers whose input is recorded
    got_f: dict[int, torch.Tensor] = {}
    last = id(group[-1].module)
    hooks = []
    for p in group:
        mid = id(p.module)

        def on_q(mod, args, mid=mid):
            if mid in feeds:
                accs[mid].add(mod, args[0], got_f.pop(mid, None))
            if mid == last:
                raise _Stop

        hooks.append(p.module.register_forward_pre_hook(on_q))
        if method.needs_float_inputs:

            def on_f(_mod, args, mid=mid):
                if mid in feeds:
                    got_f[mid] = args[0]
                if mid == last:
                    raise _Stop

            hooks.append(ftwin[mid].register_forward_pre_hook(on_f))
    try:
        with torch.no_grad():
            for i, call in enumerate(quant_calls):
                if method.needs_float_inputs:
                    _run_until_stop(fblock, float_calls[i], xs_f[i], placement)
                _run_until_stop(block, call, xs_q[i], placement)
    finally:
        for h in hooks:
            h.remove()
    return accs


def _solve_block(method, block, fblock, plans, names, refit_ids, quant_calls, xs_q, xs_f, placement) -> dict:
    """For block-level methods (``method.block_level``): every layer's QTensor of the block at once, from the
    block run on the quantized stream against the float block's outputs on the float stream; else {}."""
    if not getattr(method, "block_level", False):
        return {}
    with torch.no_grad():
        targets = [
            placement.offload(_run_block(fblock, c, x, placement)) for c, x in zip(quant_calls, xs_f, strict=True)
        ]
    named = [
        (names[id(p.module)], p.module, get_format(p.weight_format)) for p in plans if id(p.module) not in refit_ids
    ]

    def run(i: int, params: dict) -> torch.Tensor:
        x = xs_q[i]
        if x.dim() == 4:  # image batches: channels-last convolutions (and their backward) run faster on CPU
            x = x.contiguous(memory_format=torch.channels_last)
        args, kwargs = quant_calls[i].with_x(x)
        return _first(functional_call(block, params, placement.compute(args), placement.compute(kwargs)))

    return method.solve_block(named, run, targets)


@torch.no_grad()
def _calibrate_block_inputs(block, quant_calls, xs_q, placement) -> None:
    """Calibrate the block's static input quantizers on the quantized stream (one pass), so the next blocks and
    their solves see quantized activations."""
    quants = [m for m in block.modules() if isinstance(m, ActQuantizer) and m.mode == "static" and m.bypass]
    calibrate(quants, lambda: [_run_block(block, c, x, placement) for c, x in zip(quant_calls, xs_q, strict=True)])


def _run_until_stop(block, call, x, placement) -> None:
    try:
        _run_block(block, call, x, placement)
    except _Stop:
        pass


def _advance(block, fblock, quant_calls, xs_q, xs_f, qmods, placement, need_float, stats=None):
    hooks = []
    if stats is not None:
        for m in block.modules():
            if id(m) in qmods:
                twin = qmods[id(m)][1]

                def on_out(mod, args, out, twin=twin):
                    ref = twin(args[0])
                    s = stats[id(mod)]
                    s[0] += float(ref.square().sum(dtype=torch.float64))  # squares in the stream's dtype,
                    s[1] += float((out - ref).square().sum(dtype=torch.float64))  # sums in float64

                hooks.append(m.register_forward_hook(on_out))
    try:
        with torch.no_grad():
            new_q = [
                placement.offload(_run_block(block, c, x, placement)) for c, x in zip(quant_calls, xs_q, strict=True)
            ]
            new_f = xs_f
            if need_float:  # the float stream goes through the float twin (or the untouched block)
                fb = fblock if fblock is not None else block
                new_f = [
                    placement.offload(_run_block(fb, c, x, placement)) for c, x in zip(quant_calls, xs_f, strict=True)
                ]
    finally:
        for h in hooks:
            h.remove()
    return new_q, new_f
