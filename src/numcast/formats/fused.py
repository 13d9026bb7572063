"""The compiled cast: the very same engine as the eager path, fused by ``torch.compile``.

Inductor turns the chain of element-wise ops (and the per-block amax) into one loop nest per format
(C++/OpenMP on CPU, Triton on GPU), so a cast reads its input about once instead of ~20 times. The
arithmetic is the eager code's, op for op; ``tests/formats/test_fused.py`` checks the two paths
bit-identical. Stochastic rounding stays eager (its noise comes from an explicit ``torch.Generator``).
The first call per format and shape pays the compile (about 1–5 s on 2 CPU cores).
"""

from __future__ import annotations

import functools

import torch

from numcast.formats.engine import cast_unchunked
from numcast.formats.spec import Format


@functools.lru_cache(maxsize=128)
def compiled_cast_fn(fmt: Format, rounding: str):
    """A compiled ``x -> cast(x, fmt, rounding=rounding)`` for one format and rounding mode."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        return cast_unchunked(x, fmt, rounding)  # unchunked: the fused kernel streams the whole tensor

    return torch.compile(fn, dynamic=False)
