"""The deterministic training recipe of the Fashion-MNIST CNN: the same seed gives the same bits, the global RNG
and the thread count are left alone, it trains under ``no_grad``, and retraining reproduces the shipped model's
accuracy."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open
from torch import nn

from numcast.models import fmnist_cnn as cnn
from numcast.models.fashion_mnist import fashion_mnist_dir
from numcast.training import fmnist as fm

pytestmark = pytest.mark.skipif(
    not (fashion_mnist_dir() / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)",
)

# A few optimizer steps on 1 thread (2 threads spin badly when the cores are shared): fast and still exercises
# init, shuffling, BN statistics, momentum and the LR schedule.
SHORT = {"epochs": 1, "batch_size": 32, "max_steps": 3, "threads": 1, "progress": False}


def _state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


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
        init = cnn.FmnistCNN()
    assert not torch.equal(a.stem[0].weight, init.stem[0].weight)
    assert a.stem[1].num_batches_tracked.item() == SHORT["max_steps"]


def test_training_works_under_no_grad_as_load_workload_calls_it():
    with torch.no_grad():
        a = fm.train_fmnist_cnn(seed=0, **SHORT)
        assert not torch.is_grad_enabled()
    assert _state_equal(a, fm.train_fmnist_cnn(seed=0, **SHORT))


@pytest.mark.skipif(os.environ.get("NUMCAST_SKIP_RETRAIN") == "1", reason="NUMCAST_SKIP_RETRAIN=1")
def test_retraining_reproduces_the_shipped_accuracy(tmp_path):
    """The full default recipe (about 2 minutes on 2 idle cores): the bits depend on the machine and thread
    count, the accuracy must not, beyond a few test images."""
    meta = fm.train_checkpoint(tmp_path / "m.safetensors")
    with safe_open(str(cnn.FMNIST_CNN_CHECKPOINT), framework="pt") as f:
        shipped = float(f.metadata()["test_accuracy"])
    assert abs(float(meta["test_accuracy"]) - shipped) <= 0.005
