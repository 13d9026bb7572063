"""``backend="auto"`` (the default): the compiled path for large tensors where inductor can build kernels, eager
otherwise, and the same bits either way.

The battery's formats (``list_formats``) fall into classes that run distinct code in the engine (element kind and
policy, scale granularity and rule, tensor scale, zero point, sub-block offsets, work dtype); one format per class is
compiled once and compared bit for bit, eager vs compiled vs auto, on small tensors (adversarial blocks, padded and
odd shapes) and on a tensor above the auto threshold. A format added to the registry with a new code path forms a
new class and is compared too.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from helpers import adversarial_blocks, assert_bitwise
from test_battery import sample

from numcast.formats import ops
from numcast.formats.element import work_dtype
from numcast.formats.fused import compiler_available, fresh_output, kernel_key, writes_into
from numcast.formats.ops import AUTO_MIN_ELEMENTS, cast
from numcast.formats.registry import get_format, list_formats


def format_class(fmt) -> tuple:
    """What decides which engine code a format runs (see the module docstring)."""
    e, s = fmt.element, fmt.scaling
    return (e.kind, getattr(e, "policy", None), e.signed, s.granularity, s.rule if s.scaled else None,
            s.tensor_scale, s.zero_point, bool(getattr(s, "sub_block_size", None)), work_dtype(e, s))  # fmt: skip


CLASSES: dict[tuple, str] = {}
for _f in list_formats():
    CLASSES.setdefault(format_class(_f), _f.name)
REPRESENTATIVES = sorted(CLASSES.values())

needs_compiler = pytest.mark.skipif(not compiler_available("cpu"), reason="no C++ compiler for inductor")


def small_inputs(fmt) -> list[torch.Tensor]:
    """Adversarial blocks of the format's block length (ties, powers of two, subnormals, NaN/inf, −0), random
    rows spanning its range, and odd shapes (padding, scalar tails of the vector loops, a 3-D tensor)."""
    width = fmt.block_size or 32
    with np.errstate(all="ignore"):
        adv = torch.from_numpy(adversarial_blocks(width, np.random.default_rng(0)))
    adv[1, :3] = -0.0
    mixed = torch.cat([adv, sample(fmt, (24, width), seed=1)])
    xs = [mixed, sample(fmt, (5, 3 * width + 5), seed=2), sample(fmt, (6, 40), seed=3).reshape(2, 3, 40)]
    if fmt.scaling.tensor_scale:  # one inf makes a two-level tensor all NaN: also compare the finite rows
        xs.append(mixed[torch.isfinite(mixed).all(dim=1)])
    return xs


def large_input(fmt) -> torch.Tensor:
    """Just above the auto threshold: random rows spanning the range, with a few adversarial rows inside."""
    x = sample(fmt, (AUTO_MIN_ELEMENTS // 1024 + 2, 1024), seed=4)
    with np.errstate(all="ignore"):
        adv = torch.from_numpy(adversarial_blocks(1024, np.random.default_rng(1)))
    if fmt.scaling.tensor_scale:
        adv = adv[torch.isfinite(adv).all(dim=1)]
    x[5 : 5 + adv.shape[0]] = adv
    return x


@needs_compiler
@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_auto_compiled_and_eager_agree_bit_for_bit(name):
    fmt = get_format(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # auto dropping its kernel (other bits) would warn
        warnings.filterwarnings("ignore", "(?s).*scale saturates", UserWarning)  # FP16 group scales, huge values
        for x in small_inputs(fmt):
            eager = cast(x, name, backend="eager")
            assert_bitwise(cast(x, name, backend="compiled"), eager, f"{name} compiled {tuple(x.shape)}")
            assert_bitwise(cast(x, name), eager, f"{name} auto {tuple(x.shape)}")
        x = large_input(fmt)
        eager = cast(x, name, backend="eager")
        assert_bitwise(cast(x, name, backend="compiled"), eager, f"{name} compiled large")
        assert_bitwise(cast(x, name), eager, f"{name} auto large")
    key = kernel_key(x, fmt, fmt.rounding)
    into = writes_into(x, fmt, fresh_output(x, fmt))  # the kernel writing into a fresh output, where rows are a view
    assert (key, into) in ops._AUTO_CHECKED and key not in ops._AUTO_EAGER  # auto ran the compiled kernel


def test_every_registered_format_has_a_compared_class():
    assert {format_class(f) for f in list_formats()} == set(CLASSES)
    assert len(REPRESENTATIVES) >= 15  # element-wise, MX, NVFP4, channel, groups, zero point, tensor, Q4_0, ...


# ---- the policy: when auto compiles (no compiles needed: the compiled path is replaced by a spy) ----------------


class Spy:
    """Stands in for ``ops.compiled_cast``: counts calls and returns the eager result (or raises)."""

    def __init__(self, fail: Exception | None = None, perturb: bool = False):
        self.calls, self.fail, self.perturb = 0, fail, perturb

    def __call__(self, x, fmt, mode, out=None):
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        res = ops._cast_eager(x, fmt, mode)
        if self.perturb:
            res = res.clone()
            res.view(-1)[0] = torch.nextafter(res.view(-1)[0], torch.tensor(float("inf")))
        return res if out is None else out.copy_(res)


@pytest.fixture
def spy(monkeypatch):
    monkeypatch.setattr(ops, "AUTO_MIN_ELEMENTS", 256)  # small "large" tensors keep these tests fast
    monkeypatch.setattr(ops, "_AUTO_EAGER", {})
    monkeypatch.setattr(ops, "_AUTO_CHECKED", set())
    monkeypatch.setattr(ops, "compiler_available", lambda device_type: True)
    s = Spy()
    monkeypatch.setattr(ops, "compiled_cast", s)
    return s


def test_auto_compiles_from_the_threshold_on(spy):
    x = torch.randn(16, 16)  # 256 elements: at the (patched) threshold
    cast(x[:15], "mxfp4")
    assert spy.calls == 0
    cast(x, "mxfp4")
    assert spy.calls == 1
    cast(x, "mxfp4", backend="eager")
    assert spy.calls == 1


def test_auto_stays_eager_for_stochastic_rounding_gradients_tracing_and_no_compiler(spy, monkeypatch):
    x = torch.randn(32, 32)
    a = cast(x, "mxfp4", rounding="stochastic", seed=3)
    assert_bitwise(a, cast(x, "mxfp4", rounding="stochastic", seed=3, backend="eager"))
    w = x.clone().requires_grad_()
    cast(w, "mxfp4")
    with torch.no_grad():  # no gradient wanted: compiled
        cast(w, "mxfp4")
    assert spy.calls == 1
    with monkeypatch.context() as m:
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        cast(x, "mxfp4")
    with monkeypatch.context() as m:
        m.setattr(ops, "compiler_available", lambda device_type: False)
        cast(x, "mxfp4")
    assert spy.calls == 1
    cast(x, "mxfp4")
    assert spy.calls == 2


def test_a_format_that_fails_to_compile_falls_back_to_eager_once(spy):
    spy.fail = RuntimeError("inductor cannot lower this")
    x = torch.randn(32, 32)
    with pytest.warns(RuntimeWarning, match="torch.compile failed.*inductor cannot lower this"):
        y = cast(x, "mxfp4")
    assert_bitwise(y, cast(x, "mxfp4", backend="eager"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cast(x * 2, "mxfp4")  # remembered: no second attempt, no second warning
    assert spy.calls == 1
    spy.fail = None
    cast(x, "int4_g128")  # other formats still compile
    assert spy.calls == 2


def test_a_compiled_result_with_other_bits_is_dropped_for_eager(spy):
    spy.perturb = True
    x = torch.randn(32, 32)
    with pytest.warns(RuntimeWarning, match="differs from the eager"):
        y = cast(x, "mxfp4")
    assert_bitwise(y, cast(x, "mxfp4", backend="eager"))
    cast(x, "mxfp4")
    assert spy.calls == 1


def test_an_error_of_the_call_itself_is_raised_not_swallowed(spy):
    from dataclasses import replace

    fmt = get_format("mxfp4")
    bad = fmt.with_(scaling=replace(fmt.scaling, axis=3))  # no axis 3 in a 2-D tensor
    spy.fail = ValueError("scaling axis 3 is out of range")
    with pytest.raises(ValueError, match="axis 3 is out of range"):
        cast(torch.randn(32, 32), bad)
    assert not ops._AUTO_EAGER


def test_out_is_written_and_returned_by_every_backend(spy):
    x = torch.randn(32, 32)
    ref = cast(x, "nvfp4", backend="eager")
    for backend in ("auto", "eager"):
        out = torch.empty_like(x)
        assert cast(x, "nvfp4", backend=backend, out=out) is out
        assert_bitwise(out, ref, backend)
        inplace = x.clone()
        assert cast(inplace, "nvfp4", backend=backend, out=inplace) is inplace
        assert_bitwise(inplace, ref, f"{backend} in place")


def test_out_mismatches_are_refused_naming_the_field():
    x = torch.randn(8, 64)
    with pytest.raises(ValueError, match=r"its shape is \(8, 32\), the result's \(8, 64\)"):
        cast(x, "mxfp4", out=torch.empty(8, 32))
    with pytest.raises(ValueError, match="its dtype is torch.float64, the result's torch.float32"):
        cast(x, "mxfp4", out=torch.empty(8, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match="its device is meta, the result's cpu"):
        cast(x, "mxfp4", out=torch.empty(8, 64, device="meta"))
    with pytest.raises(TypeError, match="out must be a torch.Tensor"):
        cast(x, "mxfp4", out=np.empty((8, 64), np.float32))


def test_the_threshold_is_documented_and_sane():
    assert isinstance(AUTO_MIN_ELEMENTS, int) and 1 << 14 <= AUTO_MIN_ELEMENTS <= 1 << 24
    assert "AUTO_MIN_ELEMENTS" in cast.__doc__
    assert ops.BACKENDS[0] == "auto" and cast.__kwdefaults__["backend"] == "auto"
