"""What each block receives: the calibration batches' arguments of a block, as the model's own forward computes
them, for the float and the quantized stream.

Most models pass a block's output straight to the next block with the same other arguments (transformer layer
stacks): then the next block's inputs are the previous block's outputs (``direct``) and nothing is recomputed.
Models with code between their blocks (a flatten before the classifier, a residual added in the parent, masks
or rotary embeddings that differ per layer) get each block's inputs from the model's own forward: the parent
runs with the finished blocks replaced by replays of their cached outputs and stops at the next block
(:func:`recapture_block_inputs`). :func:`probe_transitions` tells, once, on the float model, which case each
transition is:

- ``direct``: block i reads block i−1's output and the same other arguments (reuse them, no forward);
- ``direct-x``: block i reads block i−1's output, but other arguments differ (a sliding-window mask): replay
  only needs block i−1's outputs (earlier replays return the same placeholder);
- ``glue``: block i's input is computed from earlier outputs by the parent (view, pooling, residual): every
  finished block is replayed with its own cached outputs (they are kept for the whole run).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from numcast.libc import page_out_module
from numcast.nn.modules import QuantWeightModule
from numcast.nn.observe import call_model
from numcast.pipeline.offload import DiskOffload

DIRECT, DIRECT_X, GLUE = "direct", "direct-x", "glue"


def _move(obj, device: torch.device | str):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_move(o, device) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device) for o in obj]
    if isinstance(obj, Mapping):  # a dict, or a tokenizer's BatchEncoding
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


@dataclass
class Placement:
    """Where a block computes; everything else is offloaded to the CPU, or with ``disk`` (a
    :class:`~numcast.pipeline.offload.DiskOffload`) its weights stay on disk until the runner reaches it."""

    device: torch.device | str = "cpu"
    disk: DiskOffload | None = None

    def enter(self, block: nn.Module) -> None:
        """The runner starts on ``block``: its weights are brought in (disk offload) and kept until ``leave``."""
        if self.disk is not None:
            self.disk.enter(block)

    def leave(self, block: nn.Module) -> None:
        """The runner is done with ``block``: its quantized layers are spilled and its weights released."""
        if self.disk is not None:
            self.disk.leave(block)

    def release(self, finished: nn.Module) -> None:
        """The runner is done with the ``finished`` block (as the model now calls it): its quantized layers'
        cached float weights are freed (their codes stay; the first use after the run decodes them again), so
        that an in-memory run holds the finished part of the model as codes only, 4-bit ones packed two to a
        byte (under disk offload the codes are spilled next instead)."""
        for m in finished.modules():
            if isinstance(m, QuantWeightModule):
                m.release_float_weight(pack=self.disk is None)

    def compute(self, obj):
        return obj.to(self.device) if isinstance(obj, nn.Module) else _move(obj, self.device)

    def offload(self, obj):
        return obj.to("cpu") if isinstance(obj, nn.Module) else _move(obj, "cpu")


class Stop(Exception):
    """Raised by a hook to end a forward pass once what it needed has been seen."""


def first_output(out):
    """The stream tensor of a block's output: the output itself, or its first element (HF layers' tuples)."""
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class BlockCall:
    """The arguments one calibration batch passes to a block. The stream tensor is ``args[0]``, else
    ``kwargs['hidden_states']``, else the first tensor among the keyword arguments (a whole model called with
    ``input_ids=...``)."""

    args: tuple
    kwargs: dict

    @property
    def stream_key(self) -> str | None:
        """None for ``args[0]``, else the keyword that carries the stream."""
        if self.args:
            return None
        if "hidden_states" in self.kwargs:
            return "hidden_states"
        for k, v in self.kwargs.items():
            if isinstance(v, torch.Tensor):
                return k
        raise ValueError("a block called with no positional argument and no tensor keyword argument: numcast cannot "
                         "tell which argument is the activation stream")

    @property
    def x(self) -> torch.Tensor:
        key = self.stream_key
        return self.args[0] if key is None else self.kwargs[key]

    def with_x(self, x: torch.Tensor | None) -> tuple[tuple, dict]:
        key = self.stream_key
        if key is None:
            return (x,) + tuple(self.args[1:]), self.kwargs
        return (), {**self.kwargs, key: x}

    def without_x(self) -> BlockCall:
        """The call with its stream tensor dropped (the streams hold it; ``with_x`` puts it back)."""
        key = self.stream_key
        if key is None:
            return BlockCall((None,) + tuple(self.args[1:]), self.kwargs)
        return _KeyedCall((), {**self.kwargs, key: None}, key)


@dataclass
class _KeyedCall(BlockCall):
    """A call whose stream keyword is fixed (its value may be None once the stream was taken out)."""

    key: str = "hidden_states"

    @property
    def stream_key(self) -> str:
        return self.key


def capture_block_inputs(model: nn.Module, block: nn.Module, batches: list, placement: Placement) -> list[BlockCall]:
    """The arguments ``block`` receives for each batch (the model's forward is stopped there)."""
    calls: list[BlockCall] = []

    def hook(_mod, args, kwargs):
        calls.append(BlockCall(placement.offload(tuple(args)), placement.offload(dict(kwargs))))
        raise Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for b in batches:
                try:
                    call_model(model, placement.compute(b))
                except Stop:
                    pass
    finally:
        handle.remove()
    if len(calls) != len(batches):
        raise RuntimeError(f"the block was reached by {len(calls)} of {len(batches)} calibration batches")
    return calls


def _same(a, b) -> bool:
    """The very same arguments (tensors by identity, containers element by element, plain values by value)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return a is b or bool(a == b)
    except Exception:  # noqa: BLE001 - objects whose == is not a plain truth value
        return False


@torch.no_grad()
def probe_transitions(model: nn.Module, blocks: list[nn.Module], batch, placement: Placement) -> list[str]:
    """How the model passes data between consecutive blocks (module docstring): ``kinds[i]`` for the transition
    into block i (``kinds[0]`` is ``"first"``), from one float forward of ``batch``. The first block must be
    called by the forward, and no block more than once (``ValueError`` naming it otherwise). A later block the
    forward never calls (a view over the model's modules, like a classifier head assembled for quantization)
    reads the previous block's output (``direct``). Only the latest block's call and output are held while the
    forward runs, and each block's checkpoint pages are given back after it ran (memory of one block)."""
    count = [0] * len(blocks)
    kinds = ["first"] + [DIRECT] * (len(blocks) - 1)
    held: dict[int, tuple[BlockCall, object]] = {}  # the latest finished block: its call and output
    pending: dict[int, BlockCall] = {}

    def pre(i: int, args, kwargs) -> None:
        count[i] += 1
        call = BlockCall(args, kwargs)
        if count[i] == 1 and i - 1 in held:
            prev, out = held[i - 1]
            if call.x is not first_output(out):
                kinds[i] = GLUE
            elif not (_same(call.without_x().args, prev.without_x().args)
                      and _same(call.without_x().kwargs, prev.without_x().kwargs)):  # fmt: skip
                kinds[i] = DIRECT_X
        pending[i] = call

    def post(i: int, out) -> None:
        held.clear()
        held[i] = (pending.pop(i), out)
        page_out_module(blocks[i])  # one forward over a memory-mapped model would leave all of it resident

    hooks = []
    for i, b in enumerate(blocks):
        hooks.append(b.register_forward_pre_hook(lambda _m, a, k, i=i: pre(i, a, k), with_kwargs=True))
        hooks.append(b.register_forward_hook(lambda _m, _a, out, i=i: post(i, out)))
    try:
        call_model(model, placement.compute(batch))
    finally:
        for h in hooks:
            h.remove()
        held.clear()
    for i, b in enumerate(blocks):
        if count[i] > 1 or (i == 0 and count[i] == 0):
            how = "never called" if not count[i] else f"called {count[i]} times"
            raise ValueError(f"block {i} ({type(b).__name__}) is {how} by the model's forward; numcast quantizes "
                             "blocks the model calls once per forward, in order (pass blocks=... explicitly)")
    return kinds


@contextmanager
def replaying(modules: list[nn.Module], output: Callable[[int], object]):
    """Within the block, ``modules[j]`` does not compute: it returns ``output(j)``."""
    for j, m in enumerate(modules):
        m.forward = lambda *a, j=j, **k: output(j)
    try:
        yield
    finally:
        for m in modules:
            m.__dict__.pop("forward", None)


@torch.no_grad()
def recapture_block_inputs(model: nn.Module, blocks: list[nn.Module], i: int, batches: list,
                           replay: Callable[[int, int], object], placement: Placement) -> list[BlockCall]:  # fmt: skip
    """The arguments block i receives for each batch from the model's own forward, with blocks 0..i−1 replayed:
    ``replay(j, b)`` is what block j returns on batch b."""
    calls: list[BlockCall] = []
    for b, batch in enumerate(batches):
        with replaying(blocks[:i], lambda j, b=b: replay(j, b)):
            got = capture_block_inputs(model, blocks[i], [batch], placement)
        calls.extend(got)
    return calls
