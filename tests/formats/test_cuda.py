"""On a CUDA device the engine must give the CPU's bits (runs only where a GPU is present)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_bitwise

from numcast.formats.ops import cast, quantize
from numcast.formats.registry import list_formats

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)


@pytest.mark.parametrize("name", [f.name for f in list_formats()])
def test_cuda_equals_cpu(name):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g) * torch.exp(torch.randn(64, 1, generator=g) * 3)
    if name in ("e8m0",) or name.startswith("uint") and "_" not in name:
        x = x.abs()
    assert_bitwise(cast(x.cuda(), name).cpu(), cast(x, name), name)
    assert_bitwise(quantize(x.cuda(), name).dequantize().cpu(), cast(x, name), name)
    assert_bitwise(cast(x.cuda(), name, backend="compiled").cpu(), cast(x, name), f"{name} compiled")
