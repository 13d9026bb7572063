"""Workload names: unknown names list the known ones."""

from __future__ import annotations

import pytest
import torch
from test_cli_quantize import tiny  # noqa: F401  (fixture)

from numcast.workloads import LOADERS, load_workload


def test_unknown_model_lists_known_names():
    with pytest.raises(ValueError, match="known models") as err:
        load_workload("mobilenet-v3")
    assert "mobilenet-v2" in str(err.value)
    assert set(LOADERS) == {"minilm-l6", "smollm2-135m", "mobilenet-v2", "efficientnet-lite0", "fmnist-cnn"}


def test_loading_a_workload_leaves_the_global_rng_alone(tiny):  # noqa: F811
    state = torch.random.get_rng_state()
    load_workload("tiny-cnn")  # its model's constructor draws initial weights
    assert torch.equal(state, torch.random.get_rng_state())
