"""The compiled backend is the eager arithmetic fused: it must agree bit for bit, and one shape-dynamic kernel
per format, rounding, dtype and device serves every tensor shape. (Every format class, eager vs compiled vs
auto: ``test_auto_backend.py``.)"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import adversarial_blocks, assert_bitwise, thp_available, vm_flags

from numcast.formats import fused
from numcast.formats.fused import compiler_available, rows_format
from numcast.formats.ops import cast
from numcast.formats.registry import get_format
from numcast.libc import HUGE_PAGE

pytestmark = pytest.mark.skipif(not compiler_available("cpu"), reason="no C++ compiler for inductor")


def adversarial(block: int = 32) -> torch.Tensor:
    with np.errstate(all="ignore"):
        adv = torch.from_numpy(adversarial_blocks(block, np.random.default_rng(0)))
    return torch.cat([adv, torch.randn(40, block) * 3]).reshape(-1, 4 * block)


@pytest.mark.parametrize("mode", ["nearest_away", "toward_zero", "floor", "ceil"])
def test_compiled_equals_eager_in_every_rounding_mode(mode):
    x = adversarial()
    assert_bitwise(cast(x, "mxfp4", rounding=mode, backend="compiled"), cast(x, "mxfp4", rounding=mode,
                   backend="eager"), mode)  # fmt: skip


@pytest.mark.parametrize("name,dtype", [("mxfp4", torch.bfloat16), ("mxfp4", torch.float16),
                                        ("mxfp4", torch.float64), ("nvfp4", torch.bfloat16)])  # fmt: skip
def test_compiled_equals_eager_in_every_input_dtype(name, dtype):
    x = adversarial().to(dtype)
    if name == "nvfp4":
        x = x[torch.isfinite(x).all(dim=1)]  # one inf would make the whole tensor NaN
    assert_bitwise(cast(x, name, backend="compiled"), cast(x, name, backend="eager"), f"{name} {dtype}")


def test_one_kernel_serves_every_shape():
    """Rows are marked dynamic: new shapes (other row counts, 3-D, padded blocks, blocks along axis 0) reuse the
    two kernels of a format (writing into a fresh output where the rows are a view, returning the rows where they
    need a copy); only the 0/1 sizes dynamo specialises on may add a graph."""
    from torch._dynamo.utils import counters

    fmt = get_format("mxfp4")
    on_rows = fmt.with_(scaling=replace(fmt.scaling, axis=0))
    assert rows_format(on_rows) == fmt
    cast(torch.randn(64, 96), fmt, backend="compiled")  # rows are a view: the kernel writes into a fresh output
    cast(torch.randn(5, 40), fmt, backend="compiled")  # padded blocks: the rows are a copy, the kernel returns rows
    before = counters["stats"]["unique_graphs"]
    for shape, f in [((3, 5, 64), fmt), ((1000, 32), fmt), ((7, 33), fmt), ((96, 7), on_rows), ((2, 4096), fmt)]:
        x = torch.randn(shape) * 4
        assert_bitwise(cast(x, f, backend="compiled"), cast(x, f, backend="eager"), str(shape))
    assert counters["stats"]["unique_graphs"] == before


@thp_available
def test_a_fresh_output_is_written_by_the_kernel_into_huge_pages():
    """Without ``out``, a large cast gets a fresh output advised to huge pages (no 4 KiB page faults), the same
    bits as the eager cast; rows that need a copy (padded blocks) keep the kernel that returns its rows."""
    x = torch.randn(2048, 2048, generator=torch.Generator().manual_seed(3))
    for name, shape in (("mxfp4", (2048, 2048)), ("nvfp4", (2048, 2048)), ("mxfp4", (2048, 2047))):
        xi = x[:, : shape[1]].contiguous()
        y = cast(xi, name, backend="compiled")
        assert_bitwise(y, cast(xi, name, backend="eager"), f"{name} {shape}")
        assert ("hg" in vm_flags(y.data_ptr() + 2 * HUGE_PAGE)) == (shape[1] % 16 == 0), shape


@pytest.mark.parametrize("bad", [None, float("nan"), float("inf")])
def test_two_level_tensor_scale_reduced_by_the_scales_kernel_keeps_the_bits(bad):
    """NVFP4's per-tensor scale is reduced by the scales kernel from the blocks' amax (a NaN/inf block left out of
    the max); the cast equals the eager one bit for bit, in every input dtype."""
    x = torch.randn(300, 64, generator=torch.Generator().manual_seed(5)) * 40
    if bad is not None:
        x[7, 3], x[200, 60] = bad, -bad
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        xi = x.to(dtype)
        assert_bitwise(cast(xi, "nvfp4", backend="compiled"), cast(xi, "nvfp4", backend="eager"), f"{bad} {dtype}")


def test_out_is_written_by_the_kernel_and_may_be_the_input():
    x = adversarial()
    ref = cast(x, "mxfp4", backend="eager")
    out = torch.full_like(x, 7.0)
    ptr = out.data_ptr()
    assert cast(x, "mxfp4", backend="compiled", out=out) is out and out.data_ptr() == ptr
    assert_bitwise(out, ref, "out")
    inplace = x.clone()
    assert cast(inplace, "mxfp4", backend="compiled", out=inplace) is inplace
    assert_bitwise(inplace, ref, "in place")
    strided = torch.empty(x.shape[1], x.shape[0]).t()  # not viewable as rows: cast, then copied in
    assert cast(x, "mxfp4", backend="compiled", out=strided) is strided
    assert_bitwise(strided, ref, "strided out")


def test_stochastic_rounding_runs_eager_under_every_backend():
    x = torch.randn(16, 64)
    ref = cast(x, "mxfp4", rounding="stochastic", seed=5, backend="eager")
    for backend in ("compiled", "auto"):
        assert_bitwise(cast(x, "mxfp4", rounding="stochastic", seed=5, backend=backend), ref, backend)


def test_the_cuda_exactness_switches_are_options_this_inductor_takes():
    """The switches the CUDA kernels are compiled with (IEEE division, no flush-to-zero: without them an H200 gave
    other bits, README GPU section) must be inductor options of the pinned torch: torch.compile refuses unknown
    ones, so a kernel compiled with them here proves the names (their effect needs a GPU: test_cuda.py)."""
    opts = fused.inductor_options("cuda")
    assert fused.exact_on_cuda() and opts.items() >= fused.CUDA_EXACT_OPTIONS.items()
    fn = torch.compile(lambda t: t / 3.0, fullgraph=True, options=opts)
    assert_bitwise(fn(torch.arange(8.0)), torch.arange(8.0) / 3.0, "compiled with the CUDA options")


def test_an_inductor_without_the_cuda_switches_gets_no_compiled_cuda_path(monkeypatch):
    monkeypatch.setattr(fused, "exact_on_cuda", lambda: False)
    with pytest.raises(RuntimeError, match="backend='eager'"):
        fused.inductor_options("cuda")
    assert fused.inductor_options("cpu") == fused.INDUCTOR_OPTIONS


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend"):
        cast(torch.zeros(4), "int8", backend="fast")


def test_compiled_casts_keep_their_bits_when_the_compiler_contracts_to_fma(tmp_path):
    """With inductor told to contract products and sums into FMAs (a user setting), the compiled casts still give
    the eager bits: every product in the arithmetic rounding is exact (``round_nearest_even_arithmetic``). A fresh
    inductor cache in a subprocess, so the kernels are built under the flag."""
    import os
    import subprocess
    import sys

    code = (
        "import numpy as np, torch, numcast\n"
        "from helpers import adversarial_blocks, assert_bitwise\n"
        "with np.errstate(all='ignore'):\n"
        "    adv = torch.from_numpy(adversarial_blocks(32, np.random.default_rng(0))).reshape(-1, 128)\n"
        "x = torch.cat([adv, torch.randn(256, 128, generator=torch.Generator().manual_seed(0)) * 3])\n"
        "for name in ('fp8_e4m3', 'fp6_e3m2', 'mxfp4', 'nvfp4'):\n"
        "    y = x[torch.isfinite(x).all(dim=1)] if name == 'nvfp4' else x\n"
        "    assert_bitwise(numcast.cast(y, name, backend='compiled'), numcast.cast(y, name, backend='eager'), name)\n"
    )
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where helpers.py lies
    env = {**os.environ, "TORCHINDUCTOR_CPP_ENABLE_FLOATING_POINT_CONTRACT_FLAG": "fast",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))}  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]


def test_a_kernel_compiled_on_a_small_tensor_still_runs_on_every_thread():
    """Inductor decides which loops OpenMP splits from the size of the call that compiles a kernel (and its on-disk
    cache keeps that code), so NVFP4's kernel first compiled on 56 rows came out single-threaded for every later
    tensor. numcast compiles with ``cpp.dynamic_threads``: the kernel's C++ has its OpenMP region whatever the first
    size. Fresh kernels (the scales' and the cast's, not the cached ones), compiled without the on-disk cache so
    their source is generated here."""
    from torch._inductor import config
    from torch._inductor.utils import run_and_get_code

    from numcast.formats.layout import Layout

    fmt = get_format("nvfp4")
    x = torch.randn(7, 128, generator=torch.Generator().manual_seed(0))
    layout = Layout.of(x.shape, fmt.scaling)
    rows = fused._mark_dynamic(layout.to_rows(x), layout)
    key = fused.kernel_key(x, fmt, "nearest_even")
    scales_kernel, kernel = fused._scales_kernel.__wrapped__(key), fused._kernel.__wrapped__(key, False)
    with config.patch(fx_graph_cache=False):
        scales, scale_sources = run_and_get_code(scales_kernel, rows)
        out, sources = run_and_get_code(kernel, rows, *scales)
    sources = scale_sources + sources
    assert_bitwise(layout.from_rows(out).reshape(x.shape), cast(x, fmt, backend="eager"))
    kernels = [s for s in sources if 'extern "C"' in s]
    assert kernels and all("#pragma omp parallel" in s for s in kernels)
