"""Where scales are shared: reshape a tensor into rows that each own one scale, and back.

Blocks run along ``Scaling.axis`` (default −1, the reduction axis of a Linear weight [out, in]).
**Padding rule**: when the axis length L is not a multiple of the block size B, the axis is padded with
zeros to ceil(L/B)·B. Zeros never raise a block's amax (nor lower its min below 0), so the last, short
block is scaled from its real values only; the padded positions are dropped again (masked) and never
stored. ``QTensor`` stores ceil(L/B) scales per row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from numcast.formats.spec import Scaling


@dataclass(frozen=True)
class Layout:
    """Rows layout of a tensor of ``shape`` under ``scaling``; rows are [R, L] with one scale per row."""

    shape: tuple[int, ...]
    granularity: str
    axis: int
    block: int
    moved_shape: tuple[int, ...]

    @staticmethod
    def of(shape: torch.Size | tuple[int, ...], scaling: Scaling) -> Layout:
        shape = tuple(shape) if len(shape) else (1,)
        g = scaling.granularity
        axis = 0
        if g in ("channel", "block"):
            if not -len(shape) <= scaling.axis < len(shape):
                raise ValueError(f"scaling axis {scaling.axis} is out of range for a tensor of shape {tuple(shape)}")
            axis = scaling.axis % len(shape)
        if g == "block":
            moved = shape[:axis] + shape[axis + 1 :] + (shape[axis],)
        elif g == "channel":
            moved = (shape[axis],) + shape[:axis] + shape[axis + 1 :]
        else:
            moved = shape
        return Layout(shape, g, axis, scaling.block_size or 0, moved)

    @property
    def n_blocks(self) -> int:
        """Blocks per row of the block axis (ceil(L/B))."""
        return -(-self.shape[self.axis] // self.block) if self.granularity == "block" else 1

    @property
    def padded(self) -> int:
        return self.n_blocks * self.block - self.shape[self.axis] if self.granularity == "block" else 0

    @property
    def scale_shape(self) -> tuple[int, ...]:
        """Shape of the scale tensor: () per tensor, (C,) per channel, (*other dims, n_blocks) per block."""
        if self.granularity == "block":
            return self.moved_shape[:-1] + (self.n_blocks,)
        if self.granularity == "channel":
            return (self.shape[self.axis],)
        return ()

    def sub_offset_shape(self, sub_block: int) -> tuple[int, ...]:
        """Shape of the sub-block offsets (shared microexponents): ``(*other dims, n_blocks · block/sub_block)``,
        one per sub-block of every (padded) block, in the order of the scales."""
        return self.moved_shape[:-1] + (self.n_blocks * (self.block // sub_block),)

    def to_rows(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(self.shape)
        if self.granularity == "block":
            xm = x.movedim(self.axis, -1)
            if self.padded:
                xm = F.pad(xm, (0, self.padded))
            return xm.reshape(-1, self.block)
        if self.granularity == "channel":  # explicit row length: an empty tensor has no -1 to infer
            c = self.shape[self.axis]
            return x.movedim(self.axis, 0).reshape(c, math.prod(self.shape) // c if c else 0)
        return x.reshape(1, -1)

    def from_rows(self, rows: torch.Tensor) -> torch.Tensor:
        if self.granularity == "block":
            xm = rows.reshape(self.moved_shape[:-1] + (self.n_blocks * self.block,))
            if self.padded:
                xm = xm[..., : self.shape[self.axis]]
            return xm.movedim(-1, self.axis)
        if self.granularity == "channel":
            return rows.reshape(self.moved_shape).movedim(0, self.axis)
        return rows.reshape(self.shape)
