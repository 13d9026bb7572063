"""On a CUDA device every backend must give the CPU's bits (runs only where a GPU is present; skipped elsewhere).

The reference is the CPU eager cast, which the rest of the battery proves against the specs, ml_dtypes and the
brute-force references. Every registered format is cast on the GPU by the eager engine, by the compiled (Triton)
kernels and through ``quantize`` (codes, scales and packed bytes included) on the same adversarial inputs the
auto-backend tests use; one format per engine code path also through ``backend="auto"`` above its threshold; six
formats in every directed rounding mode, three in every other input dtype, two through ``out=``. Stochastic
rounding on the GPU draws from a CUDA generator, so its bits differ from the CPU's: it is checked for what it
promises instead (seeded → reproducible, each value one of its two grid neighbours, unbiased).
"""

from __future__ import annotations

import re
import warnings
from contextlib import contextmanager

import pytest
import torch
from helpers import assert_bitwise
from test_auto_backend import REPRESENTATIVES, large_input, small_inputs
from test_battery import sample

from numcast.formats.ops import cast, quantize
from numcast.formats.registry import get_format, list_formats

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

CUDA = torch.device("cuda")


@contextmanager
def auto_never_drops():
    """Auto dropping a kernel (a RuntimeWarning) is an error; the warning the CPU gives too (FP16 group scales
    saturating on huge inputs) is not under test here."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        warnings.filterwarnings("ignore", "(?s).*scale saturates", UserWarning)
        yield


@pytest.mark.parametrize("name", [f.name for f in list_formats()])
def test_cuda_equals_cpu(name):
    fmt = get_format(name)
    with auto_never_drops():
        for x in small_inputs(fmt):
            ref = cast(x, name, backend="eager")
            xc = x.to(CUDA)
            shape = tuple(x.shape)
            assert_bitwise(cast(xc, name, backend="eager").cpu(), ref, f"{name} eager {shape}")
            assert_bitwise(cast(xc, name, backend="compiled").cpu(), ref, f"{name} compiled {shape}")
            try:
                q_cpu = quantize(x, name)
            except ValueError as exc:  # NaN/inf in a format without a NaN code: the GPU must refuse alike
                with pytest.raises(ValueError, match=re.escape(str(exc))):
                    quantize(xc, name)
                continue
            q_gpu = quantize(xc, name)
            assert_bitwise(q_gpu.dequantize().cpu(), ref, f"{name} quantize {shape}")
            assert q_gpu.pack() == q_cpu.pack(), f"{name} {shape}: packed codes and scales differ"


@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_cuda_auto_above_the_threshold_compiles_and_equals_cpu(name):
    x = large_input(get_format(name))
    with auto_never_drops():
        got = cast(x.to(CUDA), name)
        assert_bitwise(got.cpu(), cast(x, name, backend="eager"), f"{name} auto on cuda")


@pytest.mark.parametrize("mode", ["nearest_away", "toward_zero", "floor", "ceil"])
@pytest.mark.parametrize("name", ["int4", "fp8_e4m3", "mxfp4", "nvfp4", "int4_g128", "mx6"])
def test_cuda_equals_cpu_in_every_directed_rounding(name, mode):
    x = small_inputs(get_format(name))[0]
    with auto_never_drops():
        ref = cast(x, name, rounding=mode, backend="eager")
        for backend in ("eager", "compiled"):
            got = cast(x.to(CUDA), name, rounding=mode, backend=backend).cpu()
            assert_bitwise(got, ref, f"{name} {mode} {backend}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("name", ["fp8_e4m3", "mxfp4", "nvfp4"])
def test_cuda_equals_cpu_in_every_input_dtype(name, dtype):
    x = sample(get_format(name), (8, 256), seed=5).to(dtype)
    ref = cast(x, name, backend="eager")
    for backend in ("eager", "compiled"):
        assert_bitwise(cast(x.to(CUDA), name, backend=backend).cpu(), ref, f"{name} {dtype} {backend}")


@pytest.mark.parametrize("name", ["mxfp4", "int4_g128"])
def test_cuda_out_receives_the_cpu_bits(name):
    x = sample(get_format(name), (64, 512), seed=6)
    out = torch.full_like(x, float("nan"), device=CUDA)
    for backend in ("eager", "compiled"):
        got = cast(x.to(CUDA), name, backend=backend, out=out)
        assert got is out
        assert_bitwise(out.cpu(), cast(x, name, backend="eager"), f"{name} out= {backend}")


@pytest.mark.parametrize("name", ["int4", "mxfp4", "nvfp4"])
def test_cuda_stochastic_rounding_is_seeded_between_neighbours_and_unbiased(name):
    fmt = get_format(name)
    x = sample(fmt, (256, 1024), seed=7)
    xc = x.to(CUDA)
    a = cast(xc, name, rounding="stochastic", seed=3)
    assert_bitwise(a.cpu(), cast(xc, name, rounding="stochastic", seed=3).cpu(), f"{name} same seed")
    gen = torch.Generator(device=CUDA).manual_seed(3)
    assert_bitwise(a.cpu(), cast(xc, name, rounding="stochastic", generator=gen).cpu(), f"{name} generator")
    lo, hi = cast(x, name, rounding="floor", backend="eager"), cast(x, name, rounding="ceil", backend="eager")
    a = a.cpu()
    assert bool(((a == lo) | (a == hi)).all()), f"{name}: a stochastic value is neither grid neighbour"
    # unbiased: per element E[a] = x; over the elements whose neighbours differ, the mean error is
    # 0 within 5 standard errors (Bernoulli variance of each draw: (hi - x)(x - lo), known exactly)
    gap = lo != hi
    err = (a - x)[gap].double()
    var = ((hi - x) * (x - lo))[gap].double()
    assert abs(float(err.sum())) <= 5 * float(var.sum()) ** 0.5, f"{name}: stochastic rounding is biased"
