"""The Fashion-MNIST CNN: its blocks reproduce the model, its checkpoint round-trips bit-exactly and atomically,
a bad checkpoint is an error naming the file, and the shipped checkpoint is the accurate model its metadata
describes."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from torch import nn

from numcast.evaluate.vision import accuracy
from numcast.models import fmnist_cnn as cnn
from numcast.models.fashion_mnist import fashion_mnist_dir, load_fashion_mnist


def _state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _random_model(seed: int) -> cnn.FmnistCNN:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cnn.FmnistCNN().eval()


def test_blocks_in_order_equal_the_model_exactly():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = cnn.FmnistCNN()
        for m in model.modules():  # non-trivial BN statistics so the eval-mode path is exercised
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        x = torch.randn(6, 1, 28, 28)
    model.eval()
    blocks = cnn.fmnist_blocks(model)
    assert len(blocks) == 6 and blocks[0] is model.stem and blocks[-1] is model.head
    assert sum(isinstance(b, cnn.BasicBlock) for b in blocks) == 4
    with torch.no_grad():
        h = x
        shapes = []
        for b in blocks:
            h = b(h)
            shapes.append(tuple(h.shape[1:]))
        ref = model(x)
    assert torch.equal(h, ref) and ref.shape == (6, 10)
    assert shapes == [(32, 14, 14), (32, 14, 14), (32, 14, 14), (64, 7, 7), (128, 4, 4), (10,)]


def test_checkpoint_round_trip_is_bit_exact_and_leaves_no_temporary_file(tmp_path):
    model = _random_model(1)
    path = tmp_path / "m.safetensors"
    cnn.save_fmnist_cnn(model, path, {"seed": "1"})
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": cnn.FMNIST_CNN_FORMAT, "seed": "1"}
    loaded = cnn.load_fmnist_cnn(path)
    assert not loaded.training and _state_equal(model, loaded)


def test_a_bad_checkpoint_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "m.safetensors"
    cnn.save_fmnist_cnn(_random_model(2), path, {})
    for garbage in (b"\x00garbage", path.read_bytes()[: path.stat().st_size // 2]):
        path.write_bytes(garbage)
        with pytest.raises(ValueError, match="m.safetensors"):
            cnn.load_fmnist_cnn(path)
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        cnn.load_fmnist_cnn(tmp_path / "nothing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(path), metadata={"format": "something else"})
    with pytest.raises(ValueError, match="not an FmnistCNN checkpoint"):
        cnn.load_fmnist_cnn(path)


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        cnn.save_fmnist_cnn(_random_model(3), tmp_path / "m.safetensors", {})
    assert list(tmp_path.iterdir()) == []


def test_loading_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    before = torch.get_rng_state()
    cnn.load_fmnist_cnn()
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.skipif(not (fashion_mnist_dir() / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")  # fmt: skip
def test_shipped_checkpoint_is_accurate_and_its_metadata_tells_the_truth():
    model = cnn.load_fmnist_cnn()
    acc = accuracy(model, *load_fashion_mnist("test"))
    assert acc >= 0.90
    with safe_open(str(cnn.FMNIST_CNN_CHECKPOINT), framework="pt") as f:
        meta = f.metadata()
    assert abs(acc - float(meta["test_accuracy"])) <= 1e-4
    assert cnn.FMNIST_CNN_CHECKPOINT.stat().st_size < 2 * 1024 * 1024
