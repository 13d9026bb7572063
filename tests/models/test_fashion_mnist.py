"""Fashion-MNIST loading, the FmnistCNN blocks, deterministic training and the safetensors cache."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from numcast.models import fashion_mnist as fm
from numcast.models.assets import MissingAssetError

pytestmark = pytest.mark.skipif(
    not (fm.fashion_mnist_dir() / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)",
)

# A few optimizer steps on 1 thread (2 threads spin badly when the cores are shared): fast and still exercises
# init, shuffling, BN statistics, momentum and the LR schedule.
SHORT = {"epochs": 1, "batch_size": 32, "max_steps": 3, "threads": 1, "progress": False}


def _state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def train_split() -> tuple[torch.Tensor, torch.Tensor]:
    return fm.load_fashion_mnist("train")


def test_split_sizes_shapes_and_balanced_labels(train_split):
    x, y = train_split
    assert x.shape == (60_000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (60_000,) and y.dtype == torch.int64
    assert torch.equal(torch.bincount(y, minlength=10), torch.full((10,), 6000))
    xt, yt = fm.load_fashion_mnist("test")
    assert xt.shape == (10_000, 1, 28, 28) and yt.shape == (10_000,)
    assert torch.equal(torch.bincount(yt, minlength=10), torch.full((10,), 1000))
    assert int(y.min()) == 0 and int(y.max()) == 9


def test_normalisation_constants_give_zero_mean_unit_std(train_split):
    x, _ = train_split
    n = x.numel()
    mean = x.sum(dtype=torch.float64).item() / n
    std = ((x * x).sum(dtype=torch.float64).item() / n - mean**2) ** 0.5
    assert abs(mean) < 1e-6 and abs(std - 1) < 1e-6
    # the pixels map back onto the uint8 grid: x * std + mean = k / 255, k in 0..255
    k = (x[:2000].double() * fm.FASHION_MNIST_STD + fm.FASHION_MNIST_MEAN) * 255
    assert torch.allclose(k, k.round(), atol=1e-3) and k.min().item() > -1e-3 and k.max().item() < 255 + 1e-3
    assert k.round().unique().numel() == 256


def test_loads_return_fresh_tensors(train_split):
    x, y = fm.load_fashion_mnist("train")
    x[0] = 123.0
    y[0] = 7
    x2, y2 = fm.load_fashion_mnist("train")
    assert torch.equal(x2[0], train_split[0][0]) and y2[0] == train_split[1][0]


def _copy_dataset(tmp_path: Path) -> Path:
    for name in fm.FASHION_MNIST_FILES["test"]:
        shutil.copy(fm.FASHION_MNIST_DIR / name, tmp_path / name)
    return tmp_path


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"this is not gzip data at all", id="not-gzip"),
        pytest.param(gzip.compress(b"\x00\x00\x08\x01" + (10_000).to_bytes(4, "big")), id="wrong-ndim"),
        pytest.param(gzip.compress(b"\x00\x00\x0d\x03" + b"\x00\x00\x27\x10\x00\x00\x00\x1c" * 2), id="float-type"),
        pytest.param(
            gzip.compress(b"\x00\x00\x08\x03" + (10_000).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\0" * 99),
            id="truncated",
        ),
        pytest.param(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 12000)[:-20], id="cut-gzip"),
    ],
)
def test_corrupt_idx_raises_value_error_naming_the_file(tmp_path, monkeypatch, payload):
    d = _copy_dataset(tmp_path)
    bad = d / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(payload)
    monkeypatch.setenv(fm.FASHION_MNIST_ENV, str(d))
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz"):
        fm.load_fashion_mnist("test")


def test_out_of_range_label_is_rejected(tmp_path):
    d = _copy_dataset(tmp_path)
    raw = bytearray(gzip.decompress((d / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    raw[8 + 17] = 10
    (d / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz"):
        fm.load_fashion_mnist("test", data_dir=d)


def test_env_var_points_at_a_copy(tmp_path, monkeypatch):
    d = _copy_dataset(tmp_path)
    monkeypatch.setenv(fm.FASHION_MNIST_ENV, str(d))
    assert fm.fashion_mnist_dir() == d
    x, y = fm.load_fashion_mnist("test")
    x0, y0 = fm.load_fashion_mnist("test", data_dir=fm.FASHION_MNIST_DIR)
    assert torch.equal(x, x0) and torch.equal(y, y0)


def test_missing_dir_raises_missing_asset_error_with_apt_command(tmp_path, monkeypatch):
    monkeypatch.setenv(fm.FASHION_MNIST_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(MissingAssetError, match="apt-get install dataset-fashion-mnist"):
        fm.load_fashion_mnist("train")
    with pytest.raises(ValueError, match="split"):
        fm.load_fashion_mnist("validation")  # type: ignore[arg-type]


def test_blocks_in_order_equal_the_model_exactly():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = fm.FmnistCNN()
        for m in model.modules():  # non-trivial BN statistics so the eval-mode path is exercised
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        x = torch.randn(6, 1, 28, 28)
    model.eval()
    blocks = fm.fmnist_blocks(model)
    assert len(blocks) == 6 and blocks[0] is model.stem and blocks[-1] is model.head
    assert sum(isinstance(b, fm.BasicBlock) for b in blocks) == 4
    with torch.no_grad():
        h = x
        shapes = []
        for b in blocks:
            h = b(h)
            shapes.append(tuple(h.shape[1:]))
        ref = model(x)
    assert torch.equal(h, ref) and ref.shape == (6, 10)
    assert shapes == [(32, 14, 14), (32, 14, 14), (32, 14, 14), (64, 7, 7), (128, 4, 4), (10,)]


def test_training_is_deterministic_and_leaves_the_global_rng_alone():
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    threads = torch.get_num_threads()
    a = fm.train_fmnist_cnn(seed=0, **SHORT)
    b = fm.train_fmnist_cnn(seed=0, **SHORT)
    c = fm.train_fmnist_cnn(seed=1, **SHORT)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.get_num_threads() == threads
    assert not a.training
    assert _state_equal(a, b)
    assert not _state_equal(a, c)
    # training moved the weights away from the seed's initialisation and updated the BN statistics
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        init = fm.FmnistCNN()
    assert not torch.equal(a.stem[0].weight, init.stem[0].weight)
    assert a.stem[1].num_batches_tracked.item() == SHORT["max_steps"]


def test_training_works_under_no_grad_as_load_workload_calls_it():
    with torch.no_grad():
        a = fm.train_fmnist_cnn(seed=0, **SHORT)
        assert not torch.is_grad_enabled()
    assert _state_equal(a, fm.train_fmnist_cnn(seed=0, **SHORT))


def test_accuracy_of_a_constant_predictor_is_the_class_frequency():
    class Const(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bias = nn.Parameter(torch.tensor([0.0, 0.0, 1.0] + [0.0] * 7))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bias.expand(x.shape[0], 10)

    y = torch.tensor([2, 2, 0, 5, 2, 9, 1])
    model = Const().train()
    assert fm.accuracy(model, torch.zeros(7, 1, 28, 28), y, batch_size=3) == pytest.approx(3 / 7)
    assert model.training  # mode restored


def test_cache_round_trip_is_bit_exact_and_atomic(tmp_path, monkeypatch):
    real_train = fm.train_fmnist_cnn
    calls = []

    def short_train(**kw):
        calls.append(kw)
        return real_train(**{**kw, **SHORT})

    monkeypatch.setattr(fm, "train_fmnist_cnn", short_train)
    real_accuracy = fm.accuracy  # tested on its own below; 500 test images are enough for the metadata here
    monkeypatch.setattr(fm, "accuracy", lambda model, x, y, **kw: real_accuracy(model, x[:500], y[:500], **kw))
    trained = fm.load_fmnist_cnn(cache_dir=tmp_path)
    path = tmp_path / "fmnist-cnn-v1.safetensors"
    assert len(calls) == 1 and not trained.training
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == fm.FMNIST_CNN_FORMAT and meta["seed"] == "0" and meta["epochs"] == "3"
    assert 0.0 <= float(meta["test_accuracy"]) <= 1.0

    def no_train(**kw):
        raise AssertionError("a cached model must not be retrained")

    monkeypatch.setattr(fm, "train_fmnist_cnn", no_train)
    loaded = fm.load_fmnist_cnn(cache_dir=tmp_path, train_if_missing=False)
    assert not loaded.training and _state_equal(trained, loaded)

    monkeypatch.setenv("NUMCAST_CACHE", str(tmp_path))
    assert fm.fmnist_cnn_cache_path() == path
    assert _state_equal(fm.load_fmnist_cnn(), trained)

    # a corrupt cache is an error naming the file, never a silent retrain
    for garbage in (b"\x00garbage", path.read_bytes()[: path.stat().st_size // 2]):
        path.write_bytes(garbage)
        with pytest.raises(ValueError, match="fmnist-cnn-v1.safetensors"):
            fm.load_fmnist_cnn(cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="fmnist-cnn-v1.safetensors"):
        fm.load_fmnist_cnn(cache_dir=tmp_path / "empty", train_if_missing=False)


def test_interrupted_save_leaves_no_cache(tmp_path, monkeypatch):
    import safetensors.torch

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        fm._save_atomic(fm.FmnistCNN(), tmp_path / fm.FMNIST_CNN_CACHE_NAME, {"format": fm.FMNIST_CNN_FORMAT})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not fm.fmnist_cnn_cache_path().is_file(), reason="the default FmnistCNN has not been trained")
def test_cached_default_model_is_accurate():
    model = fm.load_fmnist_cnn(train_if_missing=False)
    acc = fm.accuracy(model, *fm.load_fashion_mnist("test"))
    assert acc >= 0.90
    with safe_open(str(fm.fmnist_cnn_cache_path()), framework="pt") as f:
        recorded = float(f.metadata()["test_accuracy"])
    assert abs(acc - recorded) <= 1e-3  # the metadata tells the truth about the weights beside it
