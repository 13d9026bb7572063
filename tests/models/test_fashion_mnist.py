"""Fashion-MNIST loading: shapes, normalisation, fresh tensors, corrupt and missing files."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
import torch

from numcast.models import fashion_mnist as fm
from numcast.models.assets import MissingAssetError

pytestmark = pytest.mark.skipif(
    not (fm.fashion_mnist_dir() / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)",
)

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
