"""numcast models as QONNX graphs, proven by the reader (PyPI qonnx 1.0.0): ``execute_onnx`` runs the written graph on
real Fashion-MNIST test images, qonnx's ``Quant`` gives back numcast's integer weights and activation codes bit for
bit, ``calculate_matvec_accumulator_range`` (FINN's accumulator rule) gives every layer the width numcast proved,
and the graph passes qonnx's shape and datatype inference.

Models: the shipped fmnist-cnn (conv, BatchNorm, ReLU, residual add, global average pool, Linear) quantized to
int8 per channel with static int8/uint8 inputs under a 24-bit accumulator budget (the ``--accumulator-bits`` path),
an MLP quantized by EP-init under a 16-bit budget, the fmnist-cnn after the A2Q+ trainer (4-bit weights and
inputs, 16-bit accumulators, two training steps), and a small CNN of grouped/dilated/depthwise convolutions with
bias and pooling on random inputs; 128 evaluation images (or inputs) each.

End to end, the graph and numcast's float forward agree only up to rounding ties: numcast computes each convolution
in float32 on fake-quantized operands, the graph as an exact integer sum times the scales, so an activation that
lands within float noise of a half-integer (x / s = k + ½) can round to the other code. The tests therefore prove
exactness layer by layer (each layer fed numcast's own input) and, end to end, that every differing code is ±1 at
such a tie and that images without one agree within 1e-6 of the largest logit.
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from numcast.accumulator.bounds import min_accumulator_bits
from numcast.accumulator.codes import integer_codes
from numcast.formats.registry import get_format
from numcast.interop.export import export_model
from numcast.interop.source import ExportSource
from numcast.interop.to_qonnx import METADATA_KEY, write_qonnx
from numcast.models.assets import MissingAssetError
from numcast.nn.act_quant import ActQuantizer, calibrate
from numcast.nn.modules import QuantLinear, QuantWeightModule
from numcast.pipeline.quantize_model import quantize_model
from numcast.pipeline.settings import LayerOverride

qonnx = pytest.importorskip("qonnx")

from qonnx.core.datatype import DataType  # noqa: E402
from qonnx.core.modelwrapper import ModelWrapper  # noqa: E402
from qonnx.core.onnx_exec import execute_node, execute_onnx  # noqa: E402
from qonnx.custom_op.general.quant import quant  # noqa: E402
from qonnx.transformation.infer_datatypes import InferDataTypes  # noqa: E402
from qonnx.transformation.infer_shapes import InferShapes  # noqa: E402
from qonnx.util.basic import calculate_matvec_accumulator_range  # noqa: E402

TOL = 1e-6  # relative to the largest magnitude of the compared tensor
TIE = 1e-4  # a flipped code's x / s lies this close to a half-integer (float32 noise of values below 2^8)


# ---------------------------------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def images():
    from numcast.models.fashion_mnist import load_fashion_mnist

    try:
        x, y = load_fashion_mnist("test")
    except MissingAssetError as exc:
        pytest.skip(str(exc))
    return x[:64], x[1000:1128], (x[2000:2064], y[2000:2064])  # calibration, evaluation (128), QAT steps (64)


def _quiet_quantize(model, fmt, calibration, **fields):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the accumulator budget's "sets N % of the weights to zero" notes
        return quantize_model(model, fmt, calibration, **fields)


def _mlp(sizes=(784, 64, 32, 10), flatten=True, seed=0) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mods: list[nn.Module] = [nn.Flatten()] if flatten else []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            mods += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
        return nn.Sequential(*mods).eval()


def _source(model, recipe, x, records=None) -> ExportSource:
    return ExportSource(model, "test", recipe, report={"layers": records or []}, example_inputs=x)


@pytest.fixture(scope="module")
def cnn(images):
    from numcast.models.fmnist_cnn import load_fmnist_cnn

    calib, x, _ = images
    model = load_fmnist_cnn()
    res = _quiet_quantize(model, "int8_channel", [calib], activations="int8", accumulator={"bits": 24})
    return _source(model, res.recipe, x, res.to_records())


@pytest.fixture(scope="module")
def mlp(images):
    calib, x, _ = images
    model = _mlp()
    res = _quiet_quantize(model, "int8_channel", [calib], activations="int8", method="ep-init",
                          accumulator={"bits": 16})  # fmt: skip
    return _source(model, res.recipe, x, res.to_records())


@pytest.fixture(scope="module")
def a2q(images):
    from numcast.models.fmnist_cnn import load_fmnist_cnn
    from numcast.pipeline.quantize_model import make_recipe
    from numcast.training.qat import QATConfig, export_a2q, prepare_a2q, train_qat

    calib, x, (train_x, train_y) = images
    model = prepare_a2q(load_fmnist_cnn(), calib, weight_bits=4, input_bits=4, accumulator_bits=16, observer="minmax")
    cfg = QATConfig(epochs=1, steps_per_epoch=2, batch_size=32, progress=False, threads=1)
    train_qat(model, train_x, train_y, cfg)  # two steps: the weights move off EP-init
    recipe = make_recipe("int4_channel", activations="int4", accumulator={"bits": 16}, calibration=64)
    return _source(export_a2q(model), recipe, x)


@pytest.fixture(scope="module")
def zoo():
    """Grouped, dilated, strided and depthwise convolutions with bias, max and average pooling (with padding), a
    method-call flatten and a residual add, on random inputs."""

    class Zoo(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(4, 8, 3, padding=2, dilation=2, groups=2)
            self.pool1 = nn.MaxPool2d(2)
            self.dw = nn.Conv2d(8, 8, 3, stride=1, padding=1, groups=8)
            self.pool2 = nn.AvgPool2d(2, padding=1)
            self.fc = nn.Linear(8 * 4 * 4, 10)

        def forward(self, t):
            y = F.relu(self.conv1(t))
            y = self.pool1(y)
            y = y + torch.relu(self.dw(y))
            return self.fc(self.pool2(y).flatten(1))

    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = Zoo().eval()
    x = torch.randn(192, 4, 12, 12, generator=g)
    res = _quiet_quantize(model, "int8_channel", [x[:64]], activations="int8", accumulator={"bits": 20})
    return _source(model, res.recipe, x[64:], res.to_records())


@pytest.fixture(scope="module", params=["cnn", "mlp", "a2q", "zoo"])
def exported(request, tmp_path_factory):
    """(source, result, ModelWrapper of the written file, execute_onnx's full context on the example inputs)."""
    source = request.getfixturevalue(request.param)
    path = tmp_path_factory.mktemp("qonnx") / f"{request.param}.onnx"
    result = write_qonnx(source, path, False)
    mw = ModelWrapper(str(path))
    ctx = execute_onnx(mw, {mw.graph.input[0].name: source.example_inputs.numpy()}, return_full_exec_context=True)
    return source, result, mw, ctx


# ---------------------------------------------------------------------------------------------- helpers
def _layers(model: nn.Module) -> dict[str, QuantWeightModule]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantWeightModule)}


def _numcast_io(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """layer → (its input, its input quantizer's output, its output) in numcast's forward."""
    got, hooks = {}, []
    for name, m in _layers(model).items():
        hooks.append(m.register_forward_hook(lambda mod, i, o, n=name: got.__setitem__(n, (i[0], o))))
        hooks.append(m.input_quant.register_forward_hook(lambda mod, i, o, n=name: got.__setitem__(n + "/q", o)))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return {n: (got[n][0], got[n + "/q"], got[n][1]) for n in _layers(model)}


def _act_scale(m: QuantWeightModule) -> float:
    aq = m.input_quant
    return float(aq.scales_for(float(aq.amax)).scale.reshape(-1)[0].float())


def _codes(q_out: torch.Tensor, m: QuantWeightModule) -> np.ndarray:
    """numcast's integer activation codes from its fake-quantized tensor (x_q / s is exact: x_q = code · s)."""
    return (q_out.double() / _act_scale(m)).round().numpy()


def _int_dot(codes: np.ndarray, m: QuantWeightModule) -> np.ndarray:
    """The exact integer dot products of numcast's input codes and integer weights (float64 holds them exactly)."""
    q = integer_codes(m.qweight).reshape(m.weight.shape)
    x = torch.from_numpy(codes)
    if isinstance(m, QuantLinear):
        return F.linear(x, q).numpy()
    return F.conv2d(x, q, None, m.stride, m.padding, m.dilation, m.groups).numpy()


def _meta(mw: ModelWrapper) -> dict:
    return json.loads(mw.get_metadata_prop(METADATA_KEY))


def _node(mw: ModelWrapper, output: str):
    return next(n for n in mw.graph.node if n.output[0] == output)


def _run_layer(mw: ModelWrapper, name: str, x: np.ndarray) -> dict[str, np.ndarray]:
    """Run the graph's nodes of layer ``name`` (from its input ``Div`` to the node writing ``name``) on ``x`` with
    qonnx's own node executor (onnxruntime for standard ops, qonnx's Quant); returns every tensor."""
    nodes = list(mw.graph.node)
    first = nodes.index(_node(mw, f"{name}.x_div_scale"))
    last = nodes.index(_node(mw, name))
    ctx = {i.name: mw.get_initializer(i.name) for i in mw.graph.initializer}
    ctx[nodes[first].input[0]] = x
    opsets = {o.domain: o.version for o in mw.model.opset_import}
    for n in nodes[first : last + 1]:
        ctx[n.output[0]] = np.zeros(mw.get_tensor_shape(n.output[0]), dtype=np.float32)
        execute_node(n, ctx, mw.graph, opsets[n.domain])
    return ctx


def _rel_close(got: np.ndarray, ref: np.ndarray, tol: float = TOL) -> float:
    err = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))
    assert err <= tol, f"relative error {err:.3g} > {tol}"
    return err


def _weight_matrix(mw: ModelWrapper, dot_node) -> np.ndarray:
    """The integer weights of a Conv/MatMul as the (MW, MH) matrix of a dot product x · A (FINN's layout)."""
    w = mw.get_initializer(_node(mw, dot_node.input[1]).input[0])
    return w.reshape(w.shape[0], -1).T if dot_node.op_type == "Conv" else w


# ---------------------------------------------------------------------------------------------- execution
def test_each_layer_is_exact_given_numcasts_input(exported):
    """Fed numcast's own input, every layer's activation codes are numcast's, its accumulator is the exact integer
    dot product of its codes, and its output is numcast's within 1e-6 (relative to the largest |y|).

    The graph divides by the scale in float32 (ONNX ``Div``) and rounds that quotient; numcast rounds the exact
    quotient (``element.work_dtype``: float64 for an FP32 scale). They may differ only where the float32 quotient
    is a half-integer that the exact one is not: there numcast's code is the exact quotient's rounding and the
    graph's its neighbour, and such activations are rare (a wrong scale or rounding would differ everywhere); the
    outputs are compared on the samples without one."""
    source, result, mw, _ = exported
    io = _numcast_io(source.model, source.example_inputs)
    layers = _layers(source.model)
    assert set(result.layers) == set(layers) and not result.float_layers
    for name, m in layers.items():
        x_in, x_q, y = io[name]
        ctx = _run_layer(mw, name, x_in.numpy())
        codes, got = _codes(x_q, m), ctx[f"{name}.x_int"]
        diff = got != codes
        if diff.any():
            q32 = ctx[_node(mw, f"{name}.x_div_scale").output[0]][diff].astype(np.float64)
            exact = (x_in.double() / _act_scale(m)).numpy()[diff]  # float64 sees the side of every near-tie
            assert np.all(q32 - np.floor(q32) == 0.5) and np.all(np.abs(exact - np.floor(exact) - 0.5) > 0), name
            assert np.array_equal(codes[diff], np.round(exact)) and np.all(np.abs(got[diff] - codes[diff]) == 1)
            assert diff.mean() <= 1e-4, f"{name}: {diff.sum()} of {diff.size} codes differ"
        assert np.array_equal(ctx[f"{name}.acc"], _int_dot(got.astype(np.float64), m)), name
        same = ~diff.reshape(len(got), -1).any(1)  # the samples whose codes all agree
        _rel_close(ctx[name][same], y.numpy()[same])


def test_the_whole_graph_matches_numcast_up_to_rounding_ties(exported):
    """execute_onnx of the whole graph: the codes of every quantized activation equal numcast's except at rounding
    ties (±1, numcast's x / s within 1e-4 of a half-integer where an image first differs); the logits of images
    without such a tie equal numcast's within 1e-6 of the largest logit; ties touch few images (a wrong scale or
    rounding mode would touch all)."""
    source, _, mw, ctx = exported
    x = source.example_inputs
    io = _numcast_io(source.model, x)
    with torch.no_grad():
        ref = source.model(x).numpy()
    tied = np.zeros(x.shape[0], dtype=bool)
    for name, m in _layers(source.model).items():  # model order = graph order
        x_in, x_q, _ = io[name]
        got, want = ctx[f"{name}.x_int"].reshape(len(x), -1), _codes(x_q, m).reshape(len(x), -1)
        diff = got != want
        pres = (x_in.double() / _act_scale(m)).numpy().reshape(len(x), -1)
        for b in np.nonzero(diff.any(1) & ~tied)[0]:  # first difference of image b: a tie of numcast's own values
            pre = pres[b][diff[b]]
            assert np.all(np.abs(got[b][diff[b]] - want[b][diff[b]]) == 1), name
            assert np.all(np.abs(np.abs(pre - np.floor(pre)) - 0.5) <= TIE), (name, pre)
        tied |= diff.any(1)
    assert tied.mean() <= 0.2, f"{tied.sum()} of {len(x)} images hit a rounding tie"  # fmnist-cnn: 8 of 128
    out = ctx[mw.graph.output[0].name]
    _rel_close(out[~tied], ref[~tied])
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.95


def test_weights_through_quant_are_numcasts_codes_and_scales(exported):
    """qonnx's Quant gives numcast's integer weights exactly; the scale after the accumulator is s_x · s_w rounded
    once to float32, so Quant output × scale reproduces numcast's dequantized weight × s_x."""
    source, _, mw, _ = exported
    for name, m in _layers(source.model).items():
        qnode = _node(mw, f"{name}.weight_int")
        attrs = {a.name: (a.i if a.type == a.INT else a.s.decode()) for a in qnode.attribute}
        w = mw.get_initializer(qnode.input[0])
        scale, zeropt, bitwidth = (mw.get_initializer(i) for i in qnode.input[1:])
        got = quant(w, scale, zeropt, bitwidth, attrs["signed"], attrs["narrow"], attrs["rounding_mode"])
        q = integer_codes(m.qweight).reshape(m.weight.shape).numpy()
        got = got if m.weight.dim() > 2 else got.T
        assert np.array_equal(got, q), name
        el = m.qweight.format.element
        assert scale == 1 and zeropt == 0 and bitwidth == el.bits and attrs["signed"] == int(el.signed)
        assert attrs["narrow"] == int(bool((q > el.qmin).all())) and attrs["rounding_mode"] == "ROUND"
        s = mw.get_initializer(f"{name}.acc_scale").reshape(-1)
        want = (m.qweight.scales().reshape(-1).double() * _act_scale(m)).float().numpy()
        assert np.array_equal(s, np.broadcast_to(want, s.shape)), name
        assert np.array_equal((torch.from_numpy(q).double() * m.qweight.scales().reshape(-1, *[1] * (q.ndim - 1)))
                              .float().numpy(), m.weight.numpy())  # fmt: skip


# ---------------------------------------------------------------------------------------------- accumulators
def test_finns_accumulator_rule_agrees_with_numcasts_exact_bound(exported):
    """For every layer: qonnx's calculate_matvec_accumulator_range on the graph's integer weights and the input
    datatype the graph declares gives INT⌈log2 max(−min, 1+max)⌉+1 = the annotated INT{P} = numcast's exact bound,
    within the run's recorded bits and budget; the real accumulators lie inside that range."""
    source, _, mw, ctx = exported
    meta = _meta(mw)["layers"]
    for name, m in _layers(source.model).items():
        rec = meta[name]
        dot = _node(mw, rec["accumulator_tensor"])
        assert dot.op_type in ("Conv", "MatMul")
        in_dt = mw.get_tensor_datatype(dot.input[0])
        assert in_dt.name == rec["input"] == m.input_quant.fmt.name.split("_")[0].upper()
        lo, hi = calculate_matvec_accumulator_range(_weight_matrix(mw, dot), in_dt)
        assert lo < 0  # FINN's minimize_accumulator_width (MVAU/VVAU): a signed range → INT⌈log2 max(−min, 1+max)⌉+1
        finn_bits = math.ceil(math.log2(max(-lo, 1 + hi))) + 1
        q = integer_codes(m.qweight).long()
        exact = int(min_accumulator_bits(q, in_dt.bitwidth(), in_dt.signed(), "exact").max())
        assert finn_bits == exact == mw.get_tensor_datatype(dot.output[0]).bitwidth(), name
        assert mw.get_tensor_datatype(dot.output[0]).name == rec["accumulator"] == f"INT{exact}"
        assert rec["budget_bits"] == source.recipe.accumulator.bits and exact <= rec["budget_bits"]
        assert rec["report_bits"] in (None, exact)
        acc = ctx[dot.output[0]]
        assert lo <= acc.min() and acc.max() <= hi


def test_a_model_that_exceeds_its_recorded_accumulator_is_refused(mlp, tmp_path):
    records = [{"name": "1", "accumulator_bits": 9}]
    with pytest.raises(ValueError, match=r"1: its weights need a 1\d-bit accumulator .* records 9 bits"):
        write_qonnx(_source(mlp.model, mlp.recipe, mlp.example_inputs, records), tmp_path / "m.onnx", False)


# ---------------------------------------------------------------------------------------------- qonnx passes
def test_the_graph_passes_qonnx_shape_and_datatype_inference(exported):
    """onnx's checker passes; InferShapes recomputes every written shape; InferDataTypes keeps the activation and
    weight datatypes (Quant with scale 1 → INT/UINT) and widens the accumulators to qonnx's INT32 container (FINN's
    MinimizeAccumulatorWidth narrows them again), which holds every INT{P}; the graph then runs unchanged."""
    import onnx

    source, _, mw, ctx = exported
    onnx.checker.check_model(mw.model)
    inits = {i.name for i in mw.graph.initializer}
    written = {v.name: mw.get_tensor_shape(v.name) for v in mw.graph.value_info if v.name not in inits}
    before = {a.tensor_name: mw.get_tensor_datatype(a.tensor_name) for a in mw.graph.quantization_annotation}
    x = {mw.graph.input[0].name: source.example_inputs.numpy()}
    m2 = ModelWrapper(copy.deepcopy(mw.model))
    del m2.graph.value_info[:]
    m2 = m2.transform(InferShapes())
    assert {v.name: m2.get_tensor_shape(v.name) for v in m2.graph.value_info if v.name not in inits} == written
    assert m2.get_tensor_shape(m2.graph.output[0].name) == list(source.model(source.example_inputs).shape)
    m2 = m2.transform(InferDataTypes())
    accs = {r["accumulator_tensor"] for r in _meta(mw)["layers"].values()}
    for t, dt in before.items():
        after = m2.get_tensor_datatype(t)
        if t in accs:
            assert after == DataType["INT32"] and dt.bitwidth() <= 32 and dt.signed()
        else:
            assert after == dt, t
    out = m2.graph.output[0].name
    assert np.array_equal(execute_onnx(m2, x)[out], ctx[out])


# ---------------------------------------------------------------------------------------------- refusals
def _block_mlp(images):
    calib, x, _ = images
    return _mlp(sizes=(784 - 16, 128, 64), flatten=False), [calib.reshape(64, -1)[:, :768]], x.reshape(128, -1)[:, :768]


@pytest.mark.parametrize("fmt", ["mxfp4", "int4_g128"])
def test_block_formats_are_refused_naming_the_layer(images, fmt, tmp_path):
    model, calib, x = _block_mlp(images)
    res = quantize_model(model, fmt, calib)
    with pytest.raises(ValueError, match=rf"^0: {fmt} is a block format .*QONNX/FINN have none"):
        write_qonnx(_source(model, res.recipe, x[:8]), tmp_path / "m.onnx", False)


def test_float_fallback_writes_refused_layers_in_float_and_lists_them(images, tmp_path):
    """int8 layers stay integer cores; the mxfp4 layer is written as its dequantized float weight (no Quant) after
    the fake-quantized input; the graph equals numcast within 1e-6 (no tie on these inputs)."""
    model, calib, x = _block_mlp(images)
    res = quantize_model(model, "int8_channel", calib, activations="int8_tensor", activation_mode="static",
                         overrides=[LayerOverride(pattern="2", weights="mxfp4")])  # fmt: skip
    result = write_qonnx(_source(model, res.recipe, x), tmp_path / "m.onnx", True)
    assert set(result.layers) == {"0"} and set(result.float_layers) == {"2"}
    assert "mxfp4 is a block format" in result.float_layers["2"]
    mw = ModelWrapper(str(tmp_path / "m.onnx"))
    assert _node(mw, "2.y").op_type == "MatMul" and mw.get_initializer("2.weight") is not None
    assert np.array_equal(mw.get_initializer("2.weight").T, model[2].weight.numpy())
    assert _meta(mw)["float_layers"] == result.float_layers
    out = execute_onnx(mw, {mw.graph.input[0].name: x.numpy()})[mw.graph.output[0].name]
    with torch.no_grad():
        _rel_close(out, model(x).numpy())


def test_dynamic_and_float_activations_are_refused(images, tmp_path):
    model, calib, x = _block_mlp(images)
    res = quantize_model(copy.deepcopy(model), "int8_channel", calib, activations="int8_tensor")
    with pytest.raises(ValueError, match="^0: its input/output quantizer is dynamic .*FINN needs static scales"):
        write_qonnx(_source(res.model, res.recipe, x), tmp_path / "m.onnx", False)
    res = quantize_model(copy.deepcopy(model), "int8_channel", calib, activations="fp8_e4m3_tensor",
                         activation_mode="static")  # fmt: skip
    with pytest.raises(ValueError, match="^0: activation format fp8_e4m3_tensor is not an integer"):
        write_qonnx(_source(res.model, res.recipe, x), tmp_path / "m.onnx", True)


def test_unsupported_modules_and_functions_are_named(images, tmp_path):
    model, calib, x = _block_mlp(images)
    model[1] = nn.GELU()
    res = quantize_model(model, "int8_channel", calib)
    with pytest.raises(ValueError, match=r"^1: GELU is not supported by the QONNX export"):
        write_qonnx(_source(model, res.recipe, x), tmp_path / "m.onnx", False)

    class Sig(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, t):
            return torch.sigmoid(self.inner(t))

    model, calib, x = _block_mlp(images)
    res = quantize_model(model, "int8_channel", calib)
    wrapped = Sig(model)
    with pytest.raises(ValueError, match=r"sigmoid.* is not supported by the QONNX export"):
        write_qonnx(_source(wrapped, res.recipe, x), tmp_path / "m.onnx", False)


# ---------------------------------------------------------------------------------------------- other layouts
def test_weight_only_layers_use_scaled_quant_and_stay_unannotated(images, tmp_path):
    """Without input quantizers the weights are Quant(numcast's dequantized weight, per-channel scale): qonnx gives
    numcast's weight back bit for bit; no accumulator is annotated and the layers are listed as such."""
    model, calib, x = _block_mlp(images)
    with torch.no_grad():
        model[0].weight[3] = 0.0  # an all-zero channel (numcast gives it the smallest subnormal scale)
    res = quantize_model(model, "int4_channel", calib)
    result = write_qonnx(_source(model, res.recipe, x), tmp_path / "m.onnx", False)
    mw = ModelWrapper(str(tmp_path / "m.onnx"))
    meta = _meta(mw)
    assert meta["unannotated"] == ["0", "2"] and all(v["accumulator"] is None for v in meta["layers"].values())
    assert "accumulator not annotated" in result.layers["0"]
    ctx = execute_onnx(mw, {mw.graph.input[0].name: x.numpy()}, return_full_exec_context=True)
    for name in ("0", "2"):
        w = model.get_submodule(name).weight.numpy()
        assert np.array_equal(ctx[f"{name}.weight_q"].T.view(np.int32), w.view(np.int32))
    with torch.no_grad():
        _rel_close(ctx[mw.graph.output[0].name], model(x).numpy())


ROUNDINGS = [("nearest_even", "ROUND"), ("floor", "FLOOR"), ("toward_zero", "DOWN"), ("ceil", "CEIL")]


@pytest.mark.parametrize("rounding, mode", ROUNDINGS)
def test_activation_rounding_modes_are_exact_on_ties(rounding, mode, tmp_path):
    """A static quantizer rounding ``nearest_even`` / ``floor`` / ``toward_zero`` / ``ceil`` becomes that qonnx
    rounding_mode with the same codes, on inputs full of exact ties (x / s = j / 2 with s = 1/8: the four modes
    all disagree there); ``stochastic`` is refused."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randint(-70, 71, (64, 48), generator=g) * 0.0625).clamp(-3.875, 3.875)
    x[0, 0] = 3.875  # amax: the int6 scale is 3.875 / 31 = 1/8 exactly
    lin = _mlp(sizes=(48, 16), flatten=False)[0]
    fmt = get_format("int6_tensor").with_(rounding=rounding)
    layer = QuantLinear(lin, "int8_channel", input_format=ActQuantizer(fmt, mode="static", axis=-1))
    model = nn.Sequential(layer).eval()
    calibrate([layer.input_quant], lambda: model(x))
    assert _act_scale(layer) == 0.125
    write_qonnx(_source(model, None, x), tmp_path / "m.onnx", False)
    mw = ModelWrapper(str(tmp_path / "m.onnx"))
    attrs = {a.name: a.s.decode() for a in _node(mw, "0.x_int").attribute if a.type == a.STRING}
    assert attrs == {"rounding_mode": mode}
    ctx = execute_onnx(mw, {mw.graph.input[0].name: x.numpy()}, return_full_exec_context=True)
    with torch.no_grad():
        codes = _codes(layer.input_quant(x), layer)
    assert np.array_equal(ctx["0.x_int"], codes)
    assert (x * 8 % 1 == 0.5).float().mean() > 0.4  # ties, both signs
    layer.input_quant.fmt = fmt.with_(rounding="stochastic")
    with pytest.raises(ValueError, match="0: activation rounding 'stochastic' .* no exact QONNX rounding_mode"):
        write_qonnx(_source(model, None, x), tmp_path / "n.onnx", False)


def test_output_and_standalone_quantizers_are_fake_quant_nodes(images, tmp_path):
    """A layer's output quantizer and a quantizer module of the model become Div ─ Quant(1) ─ Mul: numcast's
    fake-quantized tensors bit for bit (no tie on these inputs)."""
    _, x, _ = images
    lin = _mlp(sizes=(784, 16), flatten=False)[0]
    layer = QuantLinear(lin, "int8_channel", input_format=ActQuantizer("uint8_tensor", mode="static"),
                        output_format=ActQuantizer("int8_tensor", mode="static"))  # fmt: skip
    model = nn.Sequential(nn.Flatten(), nn.ReLU(), ActQuantizer("int6_tensor", mode="static"), layer).eval()
    quants = [model[2], layer.input_quant, layer.output_quant]
    calibrate(quants, lambda: model(x))
    result = write_qonnx(_source(model, None, x), tmp_path / "m.onnx", False)
    assert set(result.layers) == {"3"}
    mw = ModelWrapper(str(tmp_path / "m.onnx"))
    ctx = execute_onnx(mw, {mw.graph.input[0].name: x.numpy()}, return_full_exec_context=True)
    with torch.no_grad():
        a = model[2](model[1](model[0](x)))
        ref = model(x)
    assert np.array_equal(ctx["2"], a.numpy()) and _node(mw, "2").op_type == "Mul"
    assert [n.op_type for n in mw.graph.node][-3:] == ["Div", "Quant", "Mul"]
    assert mw.get_tensor_datatype("3.out.x_int") == DataType["INT8"]
    assert np.array_equal(ctx[mw.graph.output[0].name], ref.numpy())


# ---------------------------------------------------------------------------------------------- files
def test_the_file_is_deterministic(cnn, tmp_path):
    write_qonnx(cnn, tmp_path / "a.onnx", False)
    again = ExportSource(copy.deepcopy(cnn.model), cnn.name, cnn.recipe, report=cnn.report,
                         example_inputs=cnn.example_inputs.clone())  # fmt: skip
    write_qonnx(again, tmp_path / "b.onnx", False)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_export_model_writes_the_file_atomically(mlp, tmp_path):
    out = tmp_path / "sub" / "mlp.onnx"
    res = export_model(mlp, "qonnx", out)
    assert res.path == out and res.target == "qonnx" and out.is_file()
    assert [p.name for p in out.parent.iterdir()] == ["mlp.onnx"]
    with pytest.raises(FileExistsError):
        export_model(mlp, "qonnx", out)
