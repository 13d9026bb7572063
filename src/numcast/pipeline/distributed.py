"""torch.distributed for calibration and QAT: who am I, which calibration batches are mine, and the reductions and
broadcasts that keep every rank's model identical. Every function is the identity (or does nothing) unless
``torch.distributed`` is initialised with more than one rank, so one process runs exactly as it would without
this module.

``torchrun --nproc-per-node N -m numcast quantize ...`` starts the group from torchrun's environment
(:func:`init_from_env`: gloo on CPU, NCCL on CUDA with the device from ``LOCAL_RANK``); from Python, call
:func:`numcast.quantize_model` / the runner on every rank inside an initialised group, each rank passing the
whole calibration set.

**The unit of work is the calibration batch.** Rank r takes a contiguous share of the batches
(:func:`shard_bounds`: the first ``n mod N`` ranks one more); batches are never split, so each batch's forward
pass is the same computation as in one process. Every rank passes the same batches; differing counts, or more
ranks than batches, are ``ValueError`` on every rank (:func:`my_share`).

**Bit-identical statistics, whatever N.** One process sums GPTQ's Hessian and Error Diffusion's Gram matrices
as a left fold, in float64, over pieces (one matmul over a chunk of one batch's tokens) in calibration order
(:class:`numcast.pipeline.layer_stats.OrderedSums`). With N ranks that fold is continued across the ranks in
rank order (:func:`reduce_statistics`): rank 0 folds its pieces as one process would; rank r > 0 keeps its
pieces (:func:`defer_statistics`), receives the sums of all earlier pieces from rank r − 1, folds its own pieces
onto them in order and passes them on; the last rank broadcasts the result. Every addition is the one a single
process performs, in the same order, so the statistics, and with them every solve, are bit-identical to one
process for any N (an all-reduce would sum in an order that depends on N). Cost: a rank r > 0 holds one
``[in, in]`` float64 piece per chunk of its batches until the chain reaches it (N − 1 sends and one
broadcast per layer group); a fixed shard of several batches summed first would trade that memory for a different
(still N-independent) association, which one process would then have to share.

**Solves, outputs, observers.** Layer j of a group is solved on rank ``j mod N`` and its result broadcast
(:func:`on_owner`; an error there is raised on every rank with the owner's message); fitting it into an
accumulator budget then runs on every rank. The per-layer SQNR sums and the static activation observations are
gathered in global batch order (:func:`gather_in_order`, :func:`gather_observations`), so the report and the
static scales equal one process's too. Decisions taken on the float model before the blocks (mixed precision,
input signs) and the static scales of layers outside the blocks use every batch on every rank (the same work
N times, the same result). :func:`numcast.jobs.run_ptq` measures the metrics and writes the outputs on rank 0
only; the others wait for its record (:func:`broadcast_object`).

**Training steps.** Attention Round's block reconstruction and :func:`numcast.training.qat.train_qat` average
(or sum) their gradients over the ranks every step (:func:`all_reduce_`), DDP's semantics; their results match
one process within float tolerance (the per-step batch differs), not bit for bit.

**Failures.** :func:`fail_together` prints a failing rank's error (with its rank) to stderr and tears the group
down, so the others' collectives fail at once instead of waiting for the timeout; under torchrun the failing
process's non-zero exit stops the others.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class Rank:
    """This process's place in the group: ``rank`` of ``world_size`` (0 of 1 without a group)."""

    rank: int = 0
    world_size: int = 1
    backend: str | None = None


def active() -> bool:
    """Whether a process group of more than one rank is initialised (else everything here is a no-op)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_info() -> Rank:
    """Who am I: rank, world size and backend (``Rank()`` in one process)."""
    if not active():
        return Rank()
    return Rank(dist.get_rank(), dist.get_world_size(), str(dist.get_backend()))


def is_main() -> bool:
    """Rank 0, or the only process: the one that writes outputs and measures metrics."""
    return rank_info().rank == 0


def _comm_device() -> torch.device:
    """Where collectives take their tensors: the current CUDA device under NCCL, else the CPU."""
    if rank_info().backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def compute_device() -> torch.device | None:
    """The device a rank computes on under NCCL (``cuda:LOCAL_RANK``, set by :func:`init_from_env`), else None."""
    return _comm_device() if rank_info().backend == "nccl" else None


# ---- the group ---------------------------------------------------------------------------------------------


def init_from_env() -> bool:
    """Start the default process group when torchrun launched this process (``WORLD_SIZE`` > 1 in the
    environment; ``RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` with it): NCCL with the device ``cuda:LOCAL_RANK``
    when CUDA is available, else gloo. Ranks > 0 then write nothing to stdout (rank 0 prints the results; errors
    go to stderr, :func:`fail_together`). Returns whether a group of more than one rank is running; an already
    initialised group is kept."""
    if dist.is_available() and dist.is_initialized():
        return active()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    atexit.register(_shutdown)
    if dist.get_rank() > 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    return active()


def _shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _on_every_rank(exc: BaseException) -> BaseException:
    """Mark an error that every rank raises at the same point (nothing waits on a failed rank: no teardown)."""
    exc.numcast_every_rank = True
    return exc


@contextmanager
def fail_together():
    """Run a distributed job: an exception on this rank alone is printed to stderr with the rank, and the process
    group is torn down so the other ranks' collectives fail at once (no hang until the timeout); the exception
    goes on. Errors every rank raises together (a bad calibration set, a failed solve: :func:`my_share`,
    :func:`on_owner`) leave the group as it is. A no-op in one process."""
    try:
        yield
    except BaseException as exc:
        if active() and not getattr(exc, "numcast_every_rank", False):
            me = rank_info()
            print(f"numcast rank {me.rank} of {me.world_size} failed: {type(exc).__name__}: {exc}", file=sys.stderr,
                  flush=True)  # fmt: skip
            dist.destroy_process_group()
        raise


# ---- who does what -----------------------------------------------------------------------------------------


def shard_bounds(n: int, world_size: int) -> list[int]:
    """Rank r's share of ``n`` items is ``[bounds[r], bounds[r + 1])``: contiguous, in order, the first
    ``n mod world_size`` ranks one item more."""
    base, extra = divmod(n, world_size)
    return [r * base + min(r, extra) for r in range(world_size + 1)]


def my_slice(n: int) -> slice:
    """This rank's contiguous share of ``n`` items (:func:`shard_bounds`; all of them in one process)."""
    me = rank_info()
    bounds = shard_bounds(n, me.world_size)
    return slice(bounds[me.rank], bounds[me.rank + 1])


def _first_tensor(obj) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    values = obj.values() if isinstance(obj, Mapping) else obj if isinstance(obj, (tuple, list)) else ()
    return next((t for t in map(_first_tensor, values) if t is not None), None)


def _samples(batch) -> int:
    """Samples in one calibration batch: the leading dimension of its first tensor (1 for a scalar or none)."""
    t = _first_tensor(batch)
    return int(t.shape[0]) if t is not None and t.dim() else 1


def _all_gather(obj: Any) -> list:
    got: list = [None] * dist.get_world_size()
    dist.all_gather_object(got, obj)
    return got


def my_share(batches: list) -> list:
    """This rank's contiguous share of the calibration ``batches`` (all of them in one process). Every rank must
    pass the same batches: differing counts, or more ranks than batches, are a ``ValueError`` on every rank."""
    if not active():
        return batches
    me = rank_info()
    sizes = [_samples(b) for b in batches]
    every = _all_gather(sizes)
    if any(s != sizes for s in every):
        shown = ", ".join(f"rank {r}: {len(s)} batches, {sum(s)} samples" for r, s in enumerate(every))
        msg = (f"the ranks were given different calibration sets ({shown}); every rank passes the whole calibration "
               "set and takes its own share")  # fmt: skip
        raise _on_every_rank(ValueError(msg))
    if len(batches) < me.world_size:
        msg = (f"{me.world_size} ranks but {sum(sizes)} calibration samples in {len(batches)} batch(es): each rank "
               "needs at least one whole batch (batches are never split, so the result matches one process bit for "
               "bit); use more calibration samples or fewer ranks")  # fmt: skip
        raise _on_every_rank(ValueError(msg))
    return batches[my_slice(len(batches))]


def samples_per_rank(batches: list, world_size: int | None = None) -> list[int]:
    """Calibration samples each rank takes from ``batches`` (:func:`my_share`), rank by rank."""
    n = world_size or rank_info().world_size
    bounds = shard_bounds(len(batches), n)
    return [sum(_samples(b) for b in batches[bounds[r] : bounds[r + 1]]) for r in range(n)]


# ---- statistics: one left fold across the ranks ------------------------------------------------------------


def defer_statistics(stats: Sequence) -> None:
    """Before a calibration pass: on ranks after the first, the statistics keep their pieces instead of summing
    them (their sums continue the earlier ranks' fold, :func:`reduce_statistics`)."""
    if active() and rank_info().rank > 0:
        for s in stats:
            _check_ordered(s)
            s.defer()


def reduce_statistics(stats: Sequence, device: torch.device | str) -> None:
    """After a calibration pass: every rank's ``stats`` (the same objects in the same order on every rank) become
    the sums over all ranks' batches, folded in global batch order (module docstring); ``device``: where the
    sums live (the compute device)."""
    if not active():
        return
    me = rank_info()
    for s in stats:
        _check_ordered(s)
    if me.rank > 0:
        for s, before in zip(stats, _recv_states(me.rank - 1, device), strict=True):
            s.resume(before)
    if me.rank < me.world_size - 1:
        _send_states([s.state() for s in stats], me.rank + 1)
    last = me.world_size - 1
    final = _broadcast_states([s.state() for s in stats] if me.rank == last else None, last, device)
    if me.rank != last:
        for s, state in zip(stats, final, strict=True):
            s.load(state)


def _check_ordered(s) -> None:
    if not all(callable(getattr(s, a, None)) for a in ("defer", "resume", "state", "load")):
        raise TypeError(
            f"{type(s).__name__} statistics cannot be summed across ranks: a method's statistics need "
            "the OrderedSums protocol (numcast.pipeline.layer_stats) to run under torch.distributed"
        )


def _header(state: dict) -> dict:
    """A state's description (tensor shapes and dtypes, plain values) for the receiving side."""
    return {k: (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else ("value", v) for k, v in state.items()}


def _unpack(header: dict, take: Callable[[torch.Tensor], None], device) -> dict:
    """A state from its header, each tensor filled by ``take`` (a receive or a broadcast) in header order."""
    state = {}
    for k, (shape, what) in header.items():
        if shape == "value":
            state[k] = what
            continue
        buf = torch.empty(shape, dtype=what, device=_comm_device())
        take(buf)
        state[k] = buf.to(device)
    return state


def _tensors(state: dict) -> list[torch.Tensor]:
    return [v.to(_comm_device()).contiguous() for v in state.values() if isinstance(v, torch.Tensor)]


def _send_states(states: list[dict], dst: int) -> None:
    dist.send_object_list([[_header(s) for s in states]], dst=dst)
    for s in states:
        for t in _tensors(s):
            dist.send(t, dst)


def _recv_states(src: int, device) -> list[dict]:
    box: list = [None]
    dist.recv_object_list(box, src=src)
    return [_unpack(h, lambda buf: dist.recv(buf, src), device) for h in box[0]]


def _broadcast_states(states: list[dict] | None, src: int, device) -> list[dict]:
    box: list = [[_header(s) for s in states] if states is not None else None]
    dist.broadcast_object_list(box, src=src)
    if states is not None:
        for s in states:
            for t in _tensors(s):
                dist.broadcast(t, src)
        return states
    return [_unpack(h, lambda buf: dist.broadcast(buf, src), device) for h in box[0]]


# ---- results, values and observations ----------------------------------------------------------------------


def _move(obj, device):
    """``obj`` with every tensor in it (nested in tuples, lists, dicts and dataclasses such as QTensor) on
    ``device`` (None: unchanged)."""
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        moved = [_move(o, device) for o in obj]
        return tuple(moved) if isinstance(obj, tuple) else moved
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        moved = {f.name: _move(getattr(obj, f.name), device) for f in dataclasses.fields(obj)
                 if isinstance(getattr(obj, f.name), torch.Tensor)}  # fmt: skip
        return dataclasses.replace(obj, **moved) if moved else obj
    return obj


def broadcast_object(obj: T | None, src: int, device: torch.device | str | None = None) -> T:
    """Rank ``src``'s ``obj`` (tensors, QTensors, containers of them) on every rank, its tensors on ``device``
    on the receiving ranks."""
    if not active():
        return obj
    mine = rank_info().rank == src
    box: list = [_move(obj, "cpu") if mine else None]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return obj if mine else _move(box[0], device)


def on_owner(owner: int, work: Callable[[], T], device: torch.device | str | None = None) -> T:
    """``work()`` on rank ``owner mod N`` only, its result broadcast to every rank (tensors on ``device``); an
    exception there is raised on every rank, with the owner's message. Just ``work()`` in one process."""
    if not active():
        return work()
    me = rank_info()
    src = owner % me.world_size
    outcome, error = None, None
    if me.rank == src:
        try:
            outcome = ("ok", work())
        except Exception as exc:  # noqa: BLE001 - sent to the other ranks, then raised here unchanged
            error = exc
            outcome = ("error", f"{type(exc).__name__}: {exc}")
    kind, value = broadcast_object(outcome, src, device)
    if error is not None:
        raise _on_every_rank(error)
    if kind == "error":
        raise _on_every_rank(RuntimeError(f"rank {src} failed: {value}"))
    return value


def gather_in_order(values: dict[str, list]) -> dict[str, list]:
    """Every rank's per-batch ``values`` ({key: [one entry per batch of this rank]}), concatenated in rank order,
    which is global batch order (shares are contiguous); unchanged in one process."""
    if not active():
        return values
    every = _all_gather(values)
    keys = list(dict.fromkeys(k for v in every for k in v))
    return {k: [x for v in every for x in v.get(k, [])] for k in keys}


def gather_observations(quants: Sequence) -> None:
    """Static activation quantizers being calibrated (:class:`numcast.nn.act_quant.ActQuantizer`): each one's
    observed samples become every rank's, in global batch order, so the scales equal one process's."""
    if not active() or not quants:
        return
    every = _all_gather([list(q._seen) for q in quants])  # the observer's samples, one per call (CPU tensors)
    for i, q in enumerate(quants):
        q._seen = [t for mine in every for t in mine[i]]


# ---- training steps ----------------------------------------------------------------------------------------


def all_reduce_(tensors: Sequence[torch.Tensor | None], average: bool = False) -> None:
    """Sum (``average``: mean) ``tensors`` over the ranks, in place, in one all-reduce of their concatenation
    (None entries are skipped). Every rank gets the same values."""
    present = [t for t in tensors if t is not None]
    if not active() or not present:
        return
    flat = torch.cat([t.detach().reshape(-1).to(_comm_device()) for t in present])
    dist.all_reduce(flat)
    if average:
        flat /= dist.get_world_size()
    at = 0
    for t in present:
        t.copy_(flat[at : at + t.numel()].reshape(t.shape))
        at += t.numel()


def average_gradients(params: Sequence[torch.Tensor]) -> None:
    """Each parameter's gradient averaged over the ranks (a missing gradient counts as zero), as DDP does."""
    if not active():
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    all_reduce_([p.grad for p in params], average=True)


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (so that every rank stops a loop at the same step)."""
    if not active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose gradient is the all-reduced (summed) gradient: the sum's inputs on every rank."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        out = t.detach().to(_comm_device(), copy=True)
        dist.all_reduce(out)
        return out.to(t.device)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        out = grad.detach().to(_comm_device(), copy=True)
        dist.all_reduce(out)
        return out.to(grad.device)


def sum_with_grad(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks, differentiable (the gradient is summed over the ranks too); ``t`` itself in
    one process."""
    return _SumOverRanks.apply(t) if active() else t


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Every parameter and buffer of ``module`` set to rank ``src``'s (the same start on every rank)."""
    if not active():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            buf = t.detach().to(_comm_device()).contiguous()
            dist.broadcast(buf, src)
            t.copy_(buf)
