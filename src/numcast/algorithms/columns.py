"""Quantize a weight matrix one input column at a time with scales fixed before the elements are rounded.

GPTQ and Error Diffusion visit the input columns of W [out, in] in order and change the columns not yet
visited. A block-scaled format shares one scale across ``block_size`` consecutive input columns (blocks run
along the reduction axis), so the block's scale must be fixed before its first column is rounded:

- ``scale_rule="dynamic"`` (default): when a block's first column is reached, its scales are computed from
  the block's *current* (already updated) columns. This is the GPTQ reference's grouped behaviour.
- ``scale_rule="static"``: every scale is computed once from the float weights before the pass.

Per-channel and per-tensor scales (and NVFP4's FP32 tensor scale) always come from the float weights before
the pass (there is no later point at which all columns are known). Unscaled formats need no scale.

Shared microexponents (MX9/MX6/MX4, ``Scaling.sub_block_size``): both scale levels, the block's shared
exponent and every sub-block's offset, are fixed together at the same point (from the float weights for
``static``, from the block's current columns for ``dynamic``); a column is then cast with its block's scale
× 2^−τ of the sub-block it lies in.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from numcast.formats.engine import GridCast, grid_cast
from numcast.formats.layout import Layout
from numcast.formats.qtensor import QTensor
from numcast.formats.scale import Scales, compute_scales
from numcast.formats.spec import Format

COLUMN_SCALE_RULES = ("dynamic", "static")


class ColumnQuantizer:
    """Column-by-column quantizer of a [out, in] weight for any numcast format.

    Blocks must run along the input axis (the format's default axis −1); the input length may be any size
    (the last block is short, as in :mod:`numcast.formats.layout`).
    """

    def __init__(self, weight: torch.Tensor, fmt: Format, scale_rule: str = "dynamic") -> None:
        if weight.dim() != 2:
            raise ValueError(f"expected a [out, in] weight, got shape {tuple(weight.shape)}")
        if scale_rule not in COLUMN_SCALE_RULES:
            raise ValueError(f"unknown scale rule {scale_rule!r}; one of {COLUMN_SCALE_RULES}")
        sc = fmt.scaling
        if sc.granularity == "block" and sc.axis % 2 != 1:
            raise ValueError("column quantization needs blocks along the input axis (axis -1)")
        if sc.granularity == "channel" and sc.axis % 2 != 0:
            raise ValueError("column quantization needs per-output-channel scales (axis 0)")
        self.fmt, self.shape, self.scale_rule = fmt, tuple(weight.shape), scale_rule
        self.block = sc.block_size if sc.granularity == "block" else None
        # one column of a block format is one element per row with the row's block scale: cast it with a
        # per-row layout (same arithmetic, no padding of the column to a whole block); a sub-block's offset is
        # folded into that scale (Scales.at), so the column format has none
        self._col_fmt = fmt
        if self.block:
            self._col_fmt = replace(fmt, scaling=replace(sc, block_size=1, sub_block_size=None, sub_offset_bits=0))
        out, inp = self.shape
        self.n_blocks = -(-inp // self.block) if self.block else 1
        # element units, filled per column, in the cast's work dtype (exact there; float32 for every format
        # of 11 bits or fewer: half a float64 [out, in]); made at the first column
        self.values: torch.Tensor | None = None
        self.tensor_scale = None
        self._block_scales: list[Scales | None] = [None] * self.n_blocks
        w = weight.detach().float()
        if sc.granularity in ("tensor", "channel"):
            self._fixed = grid_cast(w, fmt).scales
        elif sc.granularity == "block":
            if sc.tensor_scale:
                self.tensor_scale = grid_cast(w, fmt).scales.tensor_scale
            if scale_rule == "static":
                for b in range(self.n_blocks):
                    self._block_scales[b] = self._scales_of(w[:, b * self.block : (b + 1) * self.block])
            self._fixed = None
        else:
            self._fixed = Scales(None)

    def _scales_of(self, slab: torch.Tensor) -> Scales:
        sc = self.fmt.scaling
        rows = torch.nn.functional.pad(slab.float(), (0, self.block - slab.shape[1]))
        return compute_scales(rows, self.fmt.element, sc, self.tensor_scale)

    def needs_scales(self, j: int) -> bool:
        """True when column j starts a block whose scales are not fixed yet (dynamic rule)."""
        return self.block is not None and j % self.block == 0 and self._block_scales[j // self.block] is None

    def fix_block(self, j: int, block_columns: torch.Tensor) -> None:
        """Fix the scales of the block starting at column j from its current columns [out, ≤block]."""
        self._block_scales[j // self.block] = self._scales_of(block_columns)

    def scales_for(self, j: int) -> Scales:
        """The per-row scales column j is cast with (its sub-block's offset folded in)."""
        if self.block is None:
            return self._fixed
        s = self._block_scales[j // self.block]
        if s is None:
            raise RuntimeError(f"block of column {j} has no scales: call fix_block first")
        return s.at(j % self.block)

    def quantize(self, column: torch.Tensor, j: int) -> torch.Tensor:
        """The quantized column j ([out] float32), recorded for :meth:`qtensor`."""
        col = column.detach().float().reshape(-1, 1)
        r = grid_cast(col, self._col_fmt, scales=self.scales_for(j))
        vals = r.layout.from_rows(r.values).reshape(-1)
        if self.values is None:  # the work dtype is the column format's, the same for every column
            self.values = torch.zeros(self.shape, dtype=vals.dtype)
        self.values[:, j] = vals
        return r.output(col.shape, torch.float32).reshape(-1)

    def qtensor(self) -> QTensor:
        """The QTensor of every quantized column (call after all columns are quantized)."""
        fmt = self.fmt
        layout = Layout.of(self.shape, fmt.scaling)
        if self.block is None:
            scales = self._fixed
        else:
            missing = [b for b, s in enumerate(self._block_scales) if s is None]
            if missing:
                raise RuntimeError(f"blocks {missing[:5]} were never fixed")
            per_block = self._block_scales
            scale = torch.stack([s.scale for s in per_block], dim=1).reshape(-1)
            zp = None
            if fmt.scaling.zero_point:
                zp = torch.stack([s.zero_point for s in per_block], dim=1).reshape(-1)
            sub = None
            if fmt.scaling.sub_block_size:  # [out, n_blocks, block/sub] -> one row per (out, block), as the layout
                sub = torch.stack([s.sub_offset for s in per_block], dim=1).reshape(scale.shape[0], -1)
            scales = Scales(scale, per_block[0].tensor_scale, zp, sub, fmt.scaling.sub_block_size or 0)
        if self.values is None:
            raise RuntimeError("no column was quantized")
        work = self.values.dtype
        r = GridCast(layout, layout.to_rows(self.values), layout.to_rows(self.values), scales, work)
        return QTensor.from_grid_cast(r, fmt, self.shape, torch.float32)
