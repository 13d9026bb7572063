"""Sequential, layer-wise calibration (the GPTQ pattern) with two activation streams.

1. Plan every layer (:mod:`numcast.pipeline.plan`); layers outside the blocks (embeddings, LM head, pooler, ...)
   take the method's data-free solve (RTN; EP-init for ``ep-init``).
2. Capture the inputs of the first block for every calibration batch (a pre-hook on the block records its
   arguments and stops the forward), once on the float model (float stream X) and once after the layers
   outside the blocks were quantized (quantized stream X̂; the same tensors when nothing before the first
   block changed). :class:`Streams` holds both.
3. For each block in order, its inputs are what the model's own forward passes it (:meth:`Streams.enter`:
   nothing to recompute when the previous block's output goes straight on with the same other arguments,
   else the parent's forward with the finished blocks replayed, :mod:`numcast.pipeline.block_inputs`). Then
   (:class:`OpenBlock`: the block, its float twin, its layers in execution order): per group of layers
   (``true sequential``: one layer, or the layers that read one tensor, like q/k/v), run the block on X̂ with
   hooks that feed the group's inputs to the method's statistics (and, for methods that
   diffuse error, the float block on X in lock step), solve, and swap in the quantized module; calibrate the
   block's static input quantizers on X̂; then advance both streams through the block, X̂ ← block(X̂) with the
   quantized layers, X ← float block(X), measuring each quantized layer's output SQNR against its float twin
   on the same input. Methods that solve whole blocks (Attention Round) do so before the groups; methods that
   diffuse error may also re-fit the float weights of layers kept in float inside the blocks.
   Padding tokens of text batches (their ``attention_mask``) are left out of the statistics, block solvers'
   losses, static activation ranges, the SQNR and the RTN guard's measure (:mod:`numcast.pipeline.padding`).
4. Static activation scales of layers outside the blocks are calibrated on the finished model.

Only the block being solved is on the compute device (:class:`Placement`); finished blocks, the float twin and
the streams stay on the CPU, and a block's float originals are released once it is done, so peak memory is
about the model plus one block's activations of the two streams. ``Placement`` is the one place that moves
things, so a distributed runner can replace it.

Under torch.distributed (:mod:`numcast.pipeline.distributed`) each rank runs this on its contiguous share of the
calibration batches: the statistics are summed across the ranks in batch order (bit-identical to one process),
layer j of a group is solved on rank j mod N and broadcast, and the SQNR terms and static observations are
gathered in batch order, so every rank ends with one process's model.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Collection, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from numcast.formats.qtensor import PackedQTensor, QTensor, compact
from numcast.libc import page_out_module
from numcast.nn.act_quant import ActQuantizer, calibrate
from numcast.nn.convert import make_quantizable
from numcast.nn.surgery import set_module
from numcast.pipeline import distributed
from numcast.pipeline.block_inputs import (
    DIRECT,
    GLUE,
    BlockCall,
    Placement,
    Stop,
    capture_block_inputs,
    first_output,
    probe_transitions,
    recapture_block_inputs,
)
from numcast.pipeline.data_free import calibrate_activations
from numcast.pipeline.methods import RTN, Method
from numcast.pipeline.offload import available_memory, return_freed_memory, trim_heap
from numcast.pipeline.padding import mask_for, observing_real_tokens, real_tokens, token_mask
from numcast.pipeline.plan import (
    LayerPlan,
    QuantizationResult,
    check_finite_weights,
    layer_reports,
    make_quant_module,
    plan_layers,
    resolve_plans,
    resolved_recipe,
)
from numcast.pipeline.recipe import Recipe


@dataclass
class OpenBlock:
    """The block being solved: the block (on the compute device), its float twin (a copy taken before any of its
    layers changed), its plans in execution order, and the quantized layers installed so far with their float
    twins (for the SQNR measurement)."""

    block: nn.Module
    float_block: nn.Module
    plans: list[LayerPlan]
    placement: Placement
    inner: dict[str, str]  # plan name -> the layer's name inside the block ("" when the block is the layer)
    read: dict[int, int] = field(default_factory=dict)  # id(float original) -> id of the input tensor it read
    installed: dict[int, tuple[LayerPlan, nn.Module]] = field(default_factory=dict)  # id(new) -> (plan, float twin)

    def twin(self, plan: LayerPlan) -> nn.Module:
        """The float twin of a layer of this block."""
        return self.float_block.get_submodule(self.inner[plan.name])

    def groups(self, true_sequential: bool, share_inputs: bool) -> list[list[LayerPlan]]:
        """Layers solved together: one group per layer in execution order; with ``share_inputs``, consecutive
        layers that read the very same input tensor (q/k/v, gate/up) form one group: quantizing one of them cannot
        change the others' input, so the result is the same as one at a time, with one calibration pass instead
        of several. Without ``true_sequential``: all layers of the block from one pass."""
        if not true_sequential:
            return [self.plans]
        groups: list[list[LayerPlan]] = []
        for p in self.plans:
            key = self.read.get(id(p.module))
            if share_inputs and groups and key is not None and self.read.get(id(groups[-1][-1].module)) == key:
                groups[-1].append(p)
            else:
                groups.append([p])
        return groups

    def install(self, model: nn.Module, plan: LayerPlan, new: nn.Module) -> None:
        """Swap ``new`` in for the layer, on the model and on the block (which may be a view of it, or the layer
        itself)."""
        twin = self.twin(plan)
        new = self.placement.compute(new)
        set_module(model, plan.name, new)
        name = self.inner[plan.name]
        if name:
            set_module(self.block, name, new)
        else:
            self.block = new
        self.installed.pop(id(plan.module), None)  # a quantized version replaced by another
        page_out_module(plan.module)  # the replaced layer's pages of a memory-mapped checkpoint go back
        plan.module = new
        self.installed[id(new)] = (plan, twin)


@dataclass
class FloatPass:
    """What one pass of a block's float twin over the float stream gives (:meth:`Streams.float_pass`): every
    layer's input per batch ({id(float original): [batch 0, batch 1, ...]}) and the block's outputs per batch."""

    inputs: dict[int, list[torch.Tensor]]
    outputs: list

    def nbytes(self) -> int:
        """Bytes of the tensors kept so far."""
        outs = [t for o in self.outputs for t in (o if isinstance(o, (tuple, list)) else (o,))]
        tensors = [t for v in self.inputs.values() for t in v] + outs
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class Streams:
    """The two activation streams at the input of the current block, one entry per calibration batch: the
    quantized stream X̂ (``quant``: produced by the quantized model so far) and the float stream X (``float``:
    the float model's, kept only when the method reads it). ``calls`` hold the batches' other block arguments
    (masks, positions, ...), the stream tensor taken out."""

    SQNR_BATCHES = 8

    def __init__(self, calls: list[BlockCall], quant: list[torch.Tensor], float_: list[torch.Tensor],
                 placement: Placement) -> None:  # fmt: skip
        self.calls, self.quant, self.float, self.placement = calls, quant, float_, placement
        self.outputs: dict[str, list] = {"quant": [], "float": []}  # the last block's whole outputs, per batch
        self.kept: dict[str, list[list]] | None = None  # every finished block's outputs (models with glue code)
        self.sqnr_batches: Collection[int] = range(len(quant))  # the batches the layers' SQNR is measured on
        self.token_masks: list[torch.Tensor | None] = [None] * len(quant)  # per batch: its real tokens (padding)

    def skip_padding(self, batches: list) -> None:
        """Leave the padding tokens of ``batches`` (the calibration batches behind the streams, in order) out of
        the statistics, block solvers' losses, static activation ranges, the SQNR and the RTN guard's measure
        (:mod:`numcast.pipeline.padding`)."""
        self.token_masks = [token_mask(b) for b in batches]

    def measure_sqnr_on(self, n_batches: int) -> None:
        """Measure the layers' SQNR on ``SQNR_BATCHES`` evenly spaced calibration batches of all ``n_batches`` (all
        of them when fewer; this rank's among them under torch.distributed): the float twin's second product
        per layer costs as much as the quantized stream's own forward."""
        share, stride = distributed.my_slice(n_batches), -(-n_batches // self.SQNR_BATCHES)
        self.sqnr_batches = {i - share.start for i in range(0, n_batches, stride) if share.start <= i < share.stop}

    def keep_all_outputs(self) -> None:
        """Keep every finished block's outputs: the model computes a block's inputs from earlier ones (glue)."""
        self.kept = {"quant": [], "float": []}

    @torch.no_grad()
    def enter(self, i: int, kind: str, model: nn.Module, blocks_now: list[nn.Module], batches: list,
              float_outside) -> None:  # fmt: skip
        """Set the streams to block i's inputs. ``direct``: they already are (the previous block's outputs, the
        same other arguments). Otherwise the model's own forward computes them, with blocks 0..i−1 replayed
        (:mod:`numcast.pipeline.block_inputs`); the float stream runs with the float originals of layers outside
        the blocks (``float_outside``: a context manager)."""
        if i == 0 or kind == DIRECT:
            return

        def replay(stream: str):
            if kind == GLUE:
                return lambda j, b: self.kept[stream][j][b]
            return lambda j, b: self.outputs[stream][b]  # direct-x: only block i−1's output reaches block i

        calls = recapture_block_inputs(model, blocks_now, i, batches, replay("quant"), self.placement)
        self.calls, self.quant = [c.without_x() for c in calls], [c.x for c in calls]
        if self.float:
            with float_outside():
                f_calls = recapture_block_inputs(model, blocks_now, i, batches, replay("float"), self.placement)
            self.float = [c.x for c in f_calls]

    @classmethod
    def start(cls, quant_calls: list[BlockCall], float_calls: list[BlockCall] | None, placement: Placement) -> Streams:
        """The streams at the first block from its captured calls (``float_calls`` None: no float stream)."""
        float_stream = [c.x for c in float_calls] if float_calls is not None else []
        return cls([c.without_x() for c in quant_calls], [c.x for c in quant_calls], float_stream, placement)

    def inputs(self, i: int, x: torch.Tensor | None = None) -> tuple[tuple, dict]:
        """The block's arguments for batch i (on the compute device), with stream tensor ``x`` (default X̂_i)."""
        args, kwargs = self.calls[i].with_x(self.quant[i] if x is None else x)
        return self.placement.compute(args), self.placement.compute(kwargs)

    def run(self, block: nn.Module, i: int, x: torch.Tensor) -> torch.Tensor:
        """The block's stream output on batch i with stream input ``x``."""
        return first_output(self._output(block, i, x))

    def _output(self, block: nn.Module, i: int, x: torch.Tensor):
        args, kwargs = self.inputs(i, x)
        return block(*args, **kwargs)

    def _set(self, stream: str, outputs: list) -> None:
        """A block's whole outputs become the stream (their first tensors) and, for replays, are remembered."""
        self.outputs[stream] = outputs
        setattr(self, stream, [first_output(o) for o in outputs])
        if self.kept is not None:
            self.kept[stream].append(outputs)

    def _run_until_stop(self, block: nn.Module, i: int, x: torch.Tensor) -> None:
        try:
            self.run(block, i, x)
        except Stop:
            pass

    @torch.no_grad()
    def order_layers(self, job: OpenBlock) -> None:
        """Sort ``job.plans`` into the order the block calls them (one pass on batch 0) and record which input
        tensor each layer read."""
        seen: list[nn.Module] = []
        alive: list = []  # keeps every input alive during the pass, so no two inputs can share an id

        def hook(mod, args):
            if mod not in seen:
                seen.append(mod)
                job.read[id(mod)] = id(args[0])
                alive.append(args[0])

        modules = [p.module for p in job.plans]
        hooks = [m.register_forward_pre_hook(hook) for m in modules]
        try:
            self.run(job.block, 0, self.quant[0])
        finally:
            for h in hooks:
                h.remove()
        order = seen + [m for m in modules if m not in seen]
        job.plans.sort(key=lambda p: order.index(p.module))

    @torch.no_grad()
    def float_pass(self, job: OpenBlock) -> FloatPass | None:
        """The float twin run once over every batch of the float stream, keeping each layer's input and the
        block's outputs (the float twin does not change while the block is solved, so this one pass replaces a
        partial float pass per group and the float pass of :meth:`advance`). None, and nothing kept, when the
        kept tensors would take more than a quarter of the memory available (estimated on batch 0) or the
        block's weights come from disk (memory first): the runner then runs the float twin per group."""
        if not self.float or self.placement.disk is not None:
            return None
        twins = {id(job.twin(p)): id(p.module) for p in job.plans}
        kept = FloatPass({key: [] for key in twins.values()}, [])

        def on_float(mod, args):
            kept.inputs[twins[id(mod)]].append(self.placement.offload(args[0]))

        hooks = [job.twin(p).register_forward_pre_hook(on_float) for p in job.plans]
        try:
            for i, x in enumerate(self.float):
                kept.outputs.append(self.placement.offload(self._output(job.float_block, i, x)))
                if i == 0 and kept.nbytes() * len(self.float) > available_memory() // 4:
                    return None
        finally:
            for h in hooks:
                h.remove()
        if any(len(v) != len(self.float) for v in kept.inputs.values()):
            return None  # a layer called more or less than once per forward: the per-group passes pair the calls
        return kept

    @torch.no_grad()
    def feed(self, job: OpenBlock, group: list[LayerPlan], method: Method, shared: bool,
             floats: FloatPass | None = None) -> dict[int, object]:  # fmt: skip
        """Every calibration batch's inputs of the group's layers, fed to the method's statistics ({id(float
        original): statistics}). Each pass stops as soon as the group's last layer (in execution order) has read
        its input: the rest of the block cannot change what the group sees. ``shared``: the group's layers read
        one tensor; Linear layers then share one statistics object (the same statistics, computed once).
        ``floats``: the float stream's layer inputs from :meth:`float_pass` (else a float pass per batch)."""
        one = shared and all(isinstance(p.module, nn.Linear) for p in group)
        stats = {id(p.module): method.statistics(p.module) for p in (group[:1] if one else group)}
        if one:
            stats.update({id(p.module): stats[id(group[0].module)] for p in group})
        for p in group:  # the last layer to read a statistics object may take its memory
            s = stats[id(p.module)]
            s.readers = (s.readers or 0) + 1
        recorded = {id(group[0].module)} if one else {id(p.module) for p in group}
        unique = list({id(s): s for s in stats.values()}.values())  # the same objects, in order, on every rank
        distributed.defer_statistics(unique)
        float_in: dict[int, torch.Tensor] = {}
        last = id(group[-1].module)
        now = [0]  # the batch being run
        hooks = []
        for p in group:
            key = id(p.module)

            def on_quant(mod, args, key=key):
                if key in recorded:
                    mask = self.token_masks[now[0]]
                    stats[key].add(mod, real_tokens(args[0], mask), real_tokens(float_in.pop(key, None), mask))
                if key == last:
                    raise Stop

            hooks.append(p.module.register_forward_pre_hook(on_quant))
            if method.needs_float_inputs and floats is None:

                def on_float(_mod, args, key=key):
                    if key in recorded:
                        float_in[key] = args[0]
                    if key == last:
                        raise Stop

                hooks.append(job.twin(p).register_forward_pre_hook(on_float))
        try:
            for i in range(len(self.calls)):
                now[0] = i
                if method.needs_float_inputs and floats is None:
                    self._run_until_stop(job.float_block, i, self.float[i])
                elif method.needs_float_inputs:
                    float_in.update({key: self.placement.compute(floats.inputs[key][i]) for key in recorded})
                self._run_until_stop(job.block, i, self.quant[i])
        finally:
            for h in hooks:
                h.remove()
        distributed.reduce_statistics(unique, self.placement.device)  # every rank's batches, in batch order
        return stats

    @torch.no_grad()
    def float_outputs(self, float_block: nn.Module) -> list[torch.Tensor]:
        """The float block's output on the float stream, per batch (offloaded): block-reconstruction targets."""
        return [self.placement.offload(self.run(float_block, i, x)) for i, x in enumerate(self.float)]

    @torch.no_grad()
    def calibrate_static_inputs(self, block: nn.Module) -> None:
        """Calibrate the block's static input quantizers on the quantized stream (one pass), so the next blocks
        and their solves see quantized activations."""
        quants = [m for m in block.modules() if isinstance(m, ActQuantizer) and m.mode == "static" and m.bypass]

        def run() -> None:
            for i, x in enumerate(self.quant):
                with observing_real_tokens(quants, self.token_masks[i]):
                    self.run(block, i, x)
            distributed.gather_observations(quants)  # every rank's batches, in batch order

        calibrate(quants, run)

    @torch.no_grad()
    def advance(self, block: nn.Module, float_block: nn.Module | None = None,
                installed: dict[int, tuple[LayerPlan, nn.Module]] | None = None,
                floats: FloatPass | None = None) -> None:  # fmt: skip
        """Both streams through the block: X̂ ← block(X̂), X ← float block(X) (the block itself when nothing in
        it changed; ``floats``: the float block's outputs kept by :meth:`float_pass`). Each ``installed`` layer's
        output SQNR against its float twin on the same input (on ``sqnr_batches``) goes into its plan."""
        installed = installed or {}
        terms: dict[str, list] = {p.name: [] for p, _ in installed.values()}  # per call: (‖y‖², ‖ŷ − y‖²)
        now = [0]  # the batch being run

        def on_out(mod, args, out):
            if now[0] in self.sqnr_batches:
                mask = self.token_masks[now[0]]
                ref, out = real_tokens(installed[id(mod)][1](args[0]), mask), real_tokens(out, mask)
                terms[installed[id(mod)][0].name].append((float(ref.square().sum(dtype=torch.float64)),
                                                          float((out - ref).square().sum(dtype=torch.float64))))

        def run_quant(i: int, x: torch.Tensor):
            now[0] = i
            return self.placement.offload(self._output(block, i, x))

        hooks = [m.register_forward_hook(on_out) for m in block.modules() if id(m) in installed]
        try:
            self._set("quant", [run_quant(i, x) for i, x in enumerate(self.quant)])
            if self.float and floats is not None:
                self._set("float", floats.outputs)
            elif self.float:  # the float stream goes through the float twin (or the untouched block)
                fb = float_block if float_block is not None else block
                self._set("float", [self.placement.offload(self._output(fb, i, x)) for i, x in enumerate(self.float)])
        finally:
            for h in hooks:
                h.remove()
        terms = distributed.gather_in_order(terms)  # every rank's batches, in batch order
        for plan, _ in installed.values():
            signal = noise = 0.0  # Σ‖y‖², Σ‖ŷ − y‖²: squares in the stream's dtype, sums in float64, in batch order
            for s, e in terms[plan.name]:
                signal, noise = signal + s, noise + e
            plan.sqnr_db = 10 * math.log10(signal / noise) if noise > 0 and signal > 0 else math.inf


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
    (``share_inputs`` groups layers reading one tensor, see :meth:`OpenBlock.groups`); otherwise all layers
    of a block are solved from one pass.
    """
    placement = placement or Placement()
    batches = list(calibration)
    if not batches:
        raise ValueError("the calibration set is empty: block-wise quantization needs calibration batches")
    if not blocks:
        raise ValueError("no blocks to quantize")
    if first_block_input not in ("capture", "model"):
        raise ValueError(f"first_block_input must be 'capture' or 'model', got {first_block_input!r}")
    with distributed.fail_together(), _without_kv_cache(model):  # a failing rank stops the group, no hang
        return _quantize_blockwise(model, blocks, batches, recipe, placement, true_sequential, progress,
                                   first_block_input, share_inputs)  # fmt: skip


@contextmanager
def _without_kv_cache(model: nn.Module):
    """Hugging Face models keep a KV cache across calls when ``config.use_cache``: a block run twice on the same
    batch would see its own earlier keys. Calibration runs without it (restored afterwards)."""
    config = getattr(model, "config", None)
    before = getattr(config, "use_cache", None)
    if before:
        config.use_cache = False
    try:
        yield
    finally:
        if before:
            config.use_cache = before


def _quantize_blockwise(model, blocks, batches, recipe, placement, true_sequential, progress, first_block_input,
                        share_inputs) -> QuantizationResult:  # fmt: skip
    t0 = time.perf_counter()
    return_freed_memory()  # freed solver matrices and activations go back to the system (not fragmented heap)
    everything, batches = batches, distributed.my_share(batches)  # torch.distributed: this rank's batches
    method = recipe.make_method(progress=progress)
    model.eval()
    make_quantizable(model)
    plans = plan_layers(model, recipe)
    resolve_plans(model, plans, recipe, everything)
    in_blocks = {id(m) for b in blocks for m in b.modules()}
    captured = first_block_input == "capture"
    kinds = probe_transitions(model, blocks, everything[0], placement) if captured else [DIRECT] * len(blocks)
    float_calls = quant_calls = _first_block_calls(model, blocks[0], batches, placement, first_block_input)
    outside = [p for p in plans if p.quantized and id(p.module) not in in_blocks]
    float_outside = _quantize_outside_blocks(model, outside, method, recipe)
    if outside:  # the quantized stream starts after them
        quant_calls = _first_block_calls(model, blocks[0], batches, placement, first_block_input)
    streams = Streams.start(quant_calls, float_calls if method.needs_float_inputs else None, placement)
    streams.measure_sqnr_on(len(everything))
    streams.skip_padding(batches)
    if GLUE in kinds:
        streams.keep_all_outputs()
    todo = {id(p.module): p for p in plans if id(p.module) in in_blocks and _solved_here(p, method)}
    blocks_now = list(blocks)  # what the model calls for each block (a block that is a bare layer gets replaced)
    bar = tqdm(blocks, desc=f"{method.name} blocks", disable=not progress, leave=False)
    guard = _rtn_guard(method, streams, everything, recipe)
    for i, block in enumerate(bar):
        streams.enter(i, kinds[i], model, blocks_now, batches, float_outside)
        if guard:
            guard.enter(i, kinds[i], model, blocks_now, batches, float_outside)
        placement.enter(block)  # disk offload: the block's weights come in here and leave below
        job = _open_block(block, todo, placement)
        if job is None:
            streams.advance(block)
            if guard:
                guard.advance(None, block)
            placement.leave(block)
            continue
        streams.order_layers(job)
        solved = _solve_whole_block(method, job, streams)
        floats = streams.float_pass(job) if method.needs_inputs and method.needs_float_inputs else None
        for group in job.groups(true_sequential, share_inputs):
            shared = true_sequential and share_inputs
            stats = streams.feed(job, group, method, shared, floats) if method.needs_inputs else {}
            for j, plan in enumerate(group):  # torch.distributed: layer j is solved on rank j mod N
                trim_heap()  # the freed temporaries of the statistics and of the last solve go before this solve
                _solve_layer(model, job, plan, method, recipe, stats.get(id(plan.module)), solved.get(plan.name), j)
            del stats  # before the next group's statistics
        streams.calibrate_static_inputs(job.block)
        streams.advance(job.block, job.float_block, job.installed, floats)
        if guard:
            guard.advance(job, block)  # after the streams: the float twin becomes the RTN block
        blocks_now[i] = placement.offload(job.block)
        placement.release(blocks_now[i])
        del job, floats  # the float twin, the float originals and the kept float inputs go (memory ~ one model)
        placement.leave(block)
        trim_heap()
    if guard:
        guard.settle(streams)
    if recipe.activations is not None and recipe.activation_mode == "static":
        calibrate_activations(model, everything, only_uncalibrated=True)  # outside the blocks; the guard's reverts
    return QuantizationResult(model, layer_reports(plans), wall_time_s=time.perf_counter() - t0,
                              recipe=resolved_recipe(recipe, plans))  # fmt: skip


class RTNGuard:
    """Error Diffusion's safeguard (``rtn_guard``): the model is never left further from the float model than
    round-to-nearest leaves it, measured on calibration data. Every ``EVERY``-th calibration batch (at least one)
    is a guard batch, and a third stream runs them through the RTN-quantized model, block by block beside the
    two others; after the last block, the quantized stream's output and the RTN stream's are compared with the
    float stream's (Σ squared error over the guard batches, float64; under torch.distributed summed over the ranks
    in batch order), and when RTN's is closer, every layer the blocks solved takes its RTN weights (and the float
    layers Error Diffusion re-fitted their original weights; static input scales are calibrated again) — said in
    each layer's report.

    Why the whole model and not each group of layers: a choice per group by its block's output error (tried
    first) kept most solutions on MiniLM at MXFP4, each bringing its block's output closer to the float block's,
    while the model ended further from float than RTN's (embedding cosine 0.876 vs RTN's 0.963, padding rows then
    in the statistics; this guard gives RTN's model there: ``benchmarks/ed_minilm.py``). Only the model's output
    sees what the blocks do with each other's errors. The guard batches stay in the statistics: holding them out
    (tried) cost SmolLM2 at MXFP4 0.8 of perplexity (26.26 → 27.04, 28 of 32 windows solved on) and changed no
    decision — MiniLM's loss shows on the batches the solves saw as well. Memory: the RTN weights of every solved
    layer (as QTensors, 4-bit ones packed; under disk offload in the spill folder, a reverted layer's spilled file
    rewritten) and the RTN stream on the guard batches."""

    EVERY = 8

    def __init__(self, streams: Streams, n_batches: int, recipe: Recipe) -> None:
        share = distributed.my_slice(n_batches)
        chosen = [i for i in range(n_batches) if i % self.EVERY == self.EVERY - 1] or [n_batches - 1]
        self.batches = [i - share.start for i in chosen if share.start <= i < share.stop]  # this rank's, local
        self.rtn = Streams([streams.calls[i] for i in self.batches], [streams.quant[i] for i in self.batches], [],
                           streams.placement)  # fmt: skip
        self.rtn.token_masks = [streams.token_masks[i] for i in self.batches]
        if streams.kept is not None:
            self.rtn.keep_all_outputs()
        self.recipe, self.method, self.disk = recipe, RTN.from_recipe(recipe), streams.placement.disk
        # plan name -> (plan, its RTN QTensor, or the file it waits in under disk offload, or a re-fitted float
        # layer's original weight)
        self.fallback: dict[str, tuple[LayerPlan, QTensor | PackedQTensor | Path | torch.Tensor]] = {}

    def enter(self, i: int, kind: str, model: nn.Module, blocks_now: list[nn.Module], batches: list,
              float_outside) -> None:  # fmt: skip
        """The RTN stream to block i's inputs (:meth:`Streams.enter` on the guard batches)."""
        self.rtn.enter(i, kind, model, blocks_now, [batches[b] for b in self.batches], float_outside)

    @torch.no_grad()
    def advance(self, job: OpenBlock | None, block: nn.Module) -> None:
        """The RTN stream through the block: its float twin with RTN weights for the quantized layers (computed
        here from the float weights and remembered), the float originals for the others. Call it after the
        block's streams advanced (the float twin becomes the RTN block)."""
        if job is None:
            self.rtn.advance(block)
            return
        rtn_block = job.float_block
        for p in job.plans:
            twin = job.twin(p)
            if not p.quantized:
                self.fallback[p.name] = (p, self.rtn.placement.offload(twin.weight.detach().clone()))
                continue
            float_plan = replace(p, module=twin)
            qt = self.method.quantize_layer(float_plan)
            self.fallback[p.name] = (p, self._keep(qt))
            new = make_quant_module(float_plan, self.recipe, qweight=qt, defer_static=True)
            if job.inner[p.name]:
                set_module(rtn_block, job.inner[p.name], new)
            else:
                rtn_block = new
        self.rtn.calibrate_static_inputs(rtn_block)
        self.rtn.advance(rtn_block)

    def _keep(self, qt: QTensor) -> QTensor | PackedQTensor | Path:
        """The RTN QTensor in memory (:func:`~numcast.formats.qtensor.compact`: 4-bit codes packed), or under disk
        offload in a spill folder file (:meth:`settle` removes it)."""
        if self.disk is None:
            return compact(qt)
        path = self.disk.spill / f"rtn-guard-{len(self.fallback)}.qtensor"
        qt.save(path, overwrite=True)
        return path

    @torch.no_grad()
    def settle(self, streams: Streams) -> None:
        """After the last block: keep the solutions, or give every solved layer its RTN version where the RTN
        stream ends closer to the float stream (static input scales left uncalibrated for the runner's pass)."""
        masks, targets = [streams.token_masks[b] for b in self.batches], [streams.float[b] for b in self.batches]
        solved = self._error([streams.quant[b] for b in self.batches], targets, masks)
        rtn = self._error(self.rtn.quant, targets, masks)
        if rtn < solved:
            for p, fallback in self.fallback.values():
                self._revert(p, fallback)
        for _, fallback in self.fallback.values():
            if isinstance(fallback, Path):
                fallback.unlink(missing_ok=True)
        self.fallback = {}

    def _revert(self, p: LayerPlan, fallback: QTensor | PackedQTensor | Path | torch.Tensor) -> None:
        """One layer back to its RTN version (a re-fitted float layer: to its original weights)."""
        if not p.quantized:
            p.module.weight.copy_(fallback.to(p.module.weight.device))
            p.method = f"{p.method} -> float weights (RTN model closer to float)"
            return
        if p.method.startswith(self.method.name):  # RTN already (an expert no calibration token reached)
            return
        qt = QTensor.load(fallback) if isinstance(fallback, Path) else fallback
        qt = qt.unpack() if isinstance(qt, PackedQTensor) else qt
        if self.disk is not None and p.module.qweight is None:  # spilled
            self.disk.respill(p.module, qt)
        else:
            p.module.set_qweight(qt)
        if p.module.input_quant is not None and p.module.input_quant.mode == "static":
            p.module.input_quant.amax.zero_()  # calibrated again on the RTN model (the runner's last static pass)
        p.method = f"{p.method} -> rtn (RTN model closer to float)"

    def _error(self, outputs: list[torch.Tensor], targets: list[torch.Tensor], masks: list) -> float:
        """Σ‖y − target‖² over the real tokens of the guard batches of every rank (float64, in batch order)."""
        terms = [float(real_tokens(y.float() - t.to(y.device).float(), m).square().sum(dtype=torch.float64))
                 for y, t, m in zip(outputs, targets, masks, strict=True)]  # fmt: skip
        total = 0.0
        for e in distributed.gather_in_order({"e": terms})["e"]:
            total += e
        return total


def _solved_here(plan: LayerPlan, method: Method) -> bool:
    """Whether the runner solves this layer inside its block: quantized layers, and with a method that re-fits
    float layers, the Linear/conv layers the recipe keeps in float."""
    return plan.quantized or (method.refits_float_layers and isinstance(plan.module, (nn.Linear, nn.Conv1d, nn.Conv2d)))


def _rtn_guard(method: Method, streams: Streams, everything: list, recipe: Recipe) -> RTNGuard | None:
    """The method's RTN guard when it asks for one (and has a float stream to compare with)."""
    return RTNGuard(streams, len(everything), recipe) if method.guards_with_rtn and streams.float else None


def _first_block_calls(model, first_block, batches, placement, first_block_input) -> list[BlockCall]:
    """What the first block receives for each batch: captured from the model's forward, or (``"model"``) the
    batches themselves."""
    if first_block_input == "model":
        return [BlockCall((b,), {}) for b in batches]
    return capture_block_inputs(model, first_block, batches, placement)


def _quantize_outside_blocks(model: nn.Module, outside: list[LayerPlan], method: Method, recipe: Recipe):
    """Layers outside the blocks (embeddings, LM head, pooler, ...) take the method's own solve when it needs no
    data, else RTN; their static input scales are calibrated on the finished model. Returns a context manager
    that puts their float originals back for a while (the float stream's forward through the model)."""
    data_free = method if not method.needs_calibration else RTN.from_recipe(recipe)
    swaps = []
    for p in outside:
        new = make_quant_module(p, recipe, qweight=data_free.quantize_layer(p), defer_static=True)
        swaps.append((p.name, p.module, new))
        set_module(model, p.name, new)
        p.module, p.method = new, f"{data_free.name} (outside blocks)"

    @contextmanager
    def float_outside():
        for name, original, _ in swaps:
            set_module(model, name, original)
        try:
            yield
        finally:
            for name, _, new in swaps:
                set_module(model, name, new)

    return float_outside


def _open_block(block: nn.Module, todo: dict[int, LayerPlan], placement: Placement) -> OpenBlock | None:
    """The block with its float twin on the compute device, or None when none of its layers is solved here. Its
    plans leave ``todo`` (keyed by the ids of float originals that are about to be released, which later modules
    may reuse)."""
    inner = {todo[id(m)].name: n for n, m in block.named_modules() if id(m) in todo}
    if not inner:
        return None
    plans = [todo.pop(id(m)) for m in block.modules() if id(m) in todo]
    check_finite_weights([p for p in plans if p.quantized])  # weights offloaded to disk arrive only now
    float_block = placement.compute(copy.deepcopy(block))
    return OpenBlock(placement.compute(block), float_block, plans, placement, inner)


def _solve_whole_block(method: Method, job: OpenBlock, streams: Streams) -> dict[str, object]:
    """{plan name: QTensor} of every quantized layer of the block from a ``solves_blocks`` method, else {}."""
    if not method.solves_blocks:
        return {}
    targets = streams.float_outputs(job.float_block)
    plans = [p for p in job.plans if p.quantized]
    masks = [mask_for(t, m) for m, t in zip(streams.token_masks, targets, strict=True)]
    solved = method.solve_block(job.block, plans, job.inner, streams.inputs, targets, masks)
    return distributed.broadcast_object(solved, 0, streams.placement.device)  # the same result on every rank


def _solve_layer(model, job: OpenBlock, plan: LayerPlan, method: Method, recipe: Recipe, stats, solved,
                 owner: int = 0) -> None:  # fmt: skip
    """Solve one layer and install it (a layer kept in float is re-fitted instead). Under torch.distributed the
    solve runs on rank ``owner mod N`` and its result is broadcast; the rest runs on every rank."""
    unreached = method.needs_inputs and solved is None and getattr(stats, "n", 0) == 0
    device = plan.module.weight.device
    if not plan.quantized:  # kept in float: its float weights absorb the upstream error
        if not unreached:
            weight = distributed.on_owner(owner, lambda: _refit(method, plan.module, stats), device)
            with torch.no_grad():
                plan.module.weight.copy_(weight)
            plan.method = f"{method.name} (float weights re-fit)"
        return
    name = method.name
    if unreached:  # an expert no calibration token was routed to: RTN, said out loud
        warnings.warn(f"{plan.name}: no calibration input reached this layer (an expert no token was routed to?); "
                      f"it gets RTN instead of {method.name}", stacklevel=2)  # fmt: skip
        method, name = RTN.from_recipe(recipe), "rtn (no calibration inputs)"
    if solved is None:
        solved = distributed.on_owner(owner, lambda: method.solve(plan, stats), device)
    qt = method.quantize_layer(plan, stats, solved)  # fitted into the accumulator budget here, on every rank
    # static input scales are calibrated once the block is done (Streams.calibrate_static_inputs)
    job.install(model, plan, make_quant_module(plan, recipe, qweight=qt, defer_static=True))
    plan.method = name


def _refit(method: Method, module: nn.Module, stats) -> torch.Tensor:
    """The layer's float weight re-fitted by ``method`` (in place; returned for the other ranks)."""
    method.refit_float(module, stats)
    return module.weight.detach()
