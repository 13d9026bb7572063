"""The statistics a weight solver gathers from a layer's calibration inputs, batch by batch (so memory does not
grow with the number of tokens), in float64.

Convolutions are seen as matrix products: inputs unfolded to ``[groups, tokens, C_in/g·Πk]``
(:func:`numcast.nn.observe.layer_inputs_2d`), weights viewed as ``[out, C_in/g·Πk]``.

Every sum is a left fold over pieces (one matmul over a chunk of one batch's tokens) in calibration order
(:class:`OrderedSums`); under torch.distributed the fold continues from rank to rank
(:mod:`numcast.pipeline.distributed`), so N ranks add the same numbers in the same order as one process.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from numcast.nn.observe import layer_inputs_2d


def _row_steps(module: nn.Module, x: torch.Tensor, chunk: int) -> tuple[range, int]:
    """(sample offsets, step) keeping one step's unfolded inputs near ``chunk`` elements (a 3×3 conv on 112²
    maps unfolds 9× its input); a Linear takes the whole batch."""
    per_sample = max(1, x[0].numel() * (9 if x.dim() > 2 else 1))
    step = x.shape[0] if isinstance(module, nn.Linear) else max(1, chunk // per_sample)
    return range(0, x.shape[0], step), step


class OrderedSums:
    """Float64 sums (``SUMS``) and integer counts (``COUNTS``) over calibration pieces, each sum a left fold of
    the pieces in the order they come (``s = p₀``, then ``s = s + pₖ``).

    :meth:`defer` keeps the pieces instead (a rank whose batches come after another rank's); :meth:`resume`
    then continues the earlier pieces' :meth:`state` with them, in order, so the sums are bit-identical to one
    fold over all pieces; :meth:`load` takes a finished state."""

    SUMS: ClassVar[tuple[str, ...]] = ()
    COUNTS: ClassVar[tuple[str, ...]] = ()
    _pending: list[dict[str, torch.Tensor]] | None = None
    readers: int | None = None  # the layers that will read the result (the runner's group); None: not known
    _spent = False

    def _check_readable(self, total: torch.Tensor | None) -> None:
        if self._spent:
            raise RuntimeError(f"{type(self).__name__}: the result was already handed to its last reader")
        if total is None or self.n == 0:
            raise ValueError("no calibration inputs reached this layer")

    def _read(self) -> bool:
        """Count one read of the result; True for the last of ``readers``, which may take the sums' own memory
        (the statistics are spent then: a down projection's float64 [in, in] sums are 63 MiB at in = 2816)."""
        if self.readers is None:
            return False
        self.readers -= 1
        self._spent = self.readers <= 0
        return self._spent

    def _fold(self, pieces: dict[str, torch.Tensor]) -> None:
        if self._pending is not None:
            self._pending.append(pieces)
            return
        for k, piece in pieces.items():
            total = getattr(self, k)
            setattr(self, k, piece if total is None else total + piece)

    def defer(self) -> None:
        """Keep the pieces from now on (:meth:`resume` folds them)."""
        self._pending = []

    def state(self) -> dict:
        """{name: sum tensor or None, name: count} of everything folded so far."""
        return {k: getattr(self, k) for k in self.SUMS + self.COUNTS}

    def resume(self, before: dict) -> None:
        """Fold the kept pieces onto ``before`` (the state of every earlier piece), in order; counts add."""
        pending, self._pending = self._pending or [], None
        for k in self.COUNTS:
            setattr(self, k, before[k] + getattr(self, k))
        for k in self.SUMS:
            setattr(self, k, before[k])
        for pieces in pending:
            self._fold(pieces)

    def load(self, state: dict) -> None:
        """Take a finished state (sums and counts over every piece)."""
        self._pending = None
        for k in self.SUMS + self.COUNTS:
            setattr(self, k, state[k])


class HessianStatistics(OrderedSums):
    """H = 2/n Σ xᵀx over calibration tokens, per group (float64)."""

    CHUNK = 1 << 24  # unfolded elements per step
    SUMS = ("h",)
    COUNTS = ("n",)

    def __init__(self) -> None:
        self.h: torch.Tensor | None = None
        self.n = 0

    def add(self, module: nn.Module, x_quant: torch.Tensor, x_float: torch.Tensor | None = None) -> None:
        x = x_quant.detach()
        starts, step = _row_steps(module, x, self.CHUNK)
        for i in starts:
            rows = layer_inputs_2d(module, x[i : i + step]).double()
            self._fold({"h": rows.transpose(1, 2) @ rows})
            self.n += rows.shape[1]

    def result(self, column_major: bool = False) -> torch.Tensor:
        """H [groups, in, in] (float64). ``column_major``: the same values in LAPACK's layout (``h.mT`` contiguous),
        which :func:`numcast.algorithms.gptq.gptq` factors in place. The last reader (``readers``) gets the sum's
        memory (row-major), or a column-major copy with the sum freed."""
        self._check_readable(self.h)
        h, last = self.h, self._read()
        if last:
            self.h = None
        if column_major:
            h = h.mT.contiguous().mT  # a copy of the values (the sum is not exactly symmetric)
        elif not last:
            return 2.0 * h / self.n
        return h.mul_(2.0).div_(self.n)  # = 2.0 * h / n, bit for bit


class GramStatistics(OrderedSums):
    """Error Diffusion's statistics per group (float64): G = ÂᵀA and H = ÂᵀÂ over calibration tokens, Â the
    layer's inputs in the quantized network and A in the float network (the same tokens, in lock step). A
    mixture-of-experts expert can be sent different tokens by the two streams (the router sees different
    inputs): for such a batch A is taken as Â (``unpaired_batches`` counts them)."""

    CHUNK = 1 << 23  # unfolded elements per step and stream
    SUMS = ("g", "h")
    COUNTS = ("n", "unpaired_batches")

    def __init__(self) -> None:
        self.g: torch.Tensor | None = None
        self.h: torch.Tensor | None = None
        self.n = 0
        self.unpaired_batches = 0  # batches whose float and quantized inputs were not the same tokens

    def add(self, module: nn.Module, x_quant: torch.Tensor, x_float: torch.Tensor | None) -> None:
        if x_float is None:
            raise RuntimeError("Error Diffusion needs the float stream's inputs of every layer it solves")
        xq, xf = x_quant.detach(), x_float.detach()
        if xq.shape != xf.shape:  # a routed expert: the two streams sent it different tokens
            xf = xq  # no float input for these tokens: the quantized input is the target (GPTQ's objective)
            self.unpaired_batches += 1
        starts, step = _row_steps(module, xq, self.CHUNK)
        for i in starts:
            rq = layer_inputs_2d(module, xq[i : i + step]).double()
            rf = layer_inputs_2d(module, xf[i : i + step]).double()
            self._fold({"g": rq.transpose(1, 2) @ rf, "h": rq.transpose(1, 2) @ rq})
            self.n += rq.shape[1]

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(G, H) [groups, in, in] (float64); the last reader (``readers``) gets the sums' own memory."""
        self._check_readable(self.g)
        if self._read():
            g, h, self.g, self.h = self.g, self.h, None, None
            return g.div_(self.n), h.div_(self.n)
        return self.g / self.n, self.h / self.n
