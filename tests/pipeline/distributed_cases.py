"""The cases of tests/pipeline/test_distributed.py: each runs once in the test process (one process, no group) and
once per rank under ``torchrun --nproc-per-node 2 tests/pipeline/distributed_cases.py LLAMA_FOLDER OUT`` (this
file as a script, inside a process group it starts itself: the Python API path). Every rank saves what it got
to ``OUT/rank{r}.pt``."""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn

from numcast.nn.modules import QuantWeightModule
from numcast.pipeline.quantize_model import count_samples
from numcast.pipeline.recipe import Recipe
from numcast.pipeline.runner import quantize_blockwise

CALIBRATION = {"fmnist-cnn": 300, "llama": 6}  # fmnist: batches of 128, 128, 44 (ranks: 256 and 44 samples);
# the Llama: 6 windows of 512 tokens in batches of 2 (ranks: 2 and 1 batches): uneven shares, a partial batch
FMNIST = {  # static input scales: the observers see every rank's batches
    "fm_ed_static": dict(
        weights="int4_channel", method="error-diffusion", activations="int8_tensor", activation_mode="static"
    ),  # fmt: skip
}
LLAMA = {
    "ll_gptq": dict(weights="int4_g32", method="gptq"),
    "ll_ed": dict(
        weights="int4_channel",
        method="error-diffusion",
        exclude=["*.down_proj"],
        error_diffusion={"calibrate_float_layers": True},
    ),  # float layers re-fitted (a broadcast weight)
}
AR = dict(weights="int4_channel", method="attention-round", attention_round={"iterations": 6, "time_budget_s": 600})


def quantized(model: nn.Module) -> dict:
    """Every quantized layer's QTensor parts, and every float weight (re-fitted ones included)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantWeightModule):
            q = m.qweight
            out[name] = (q.codes.cpu(), q.scale_codes, q.zero_point, q.tensor_scale)
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            out[name] = m.weight.detach().cpu().clone()
    return out


def quantize_case(w, batches: list, recipe: dict) -> tuple[nn.Module, dict]:
    """One recipe on a copy of the workload's float model: the model, and its tensors, per-layer SQNR and
    method."""
    model = copy.deepcopy(w.model)
    res = quantize_blockwise(model, w.blocks(model), batches, Recipe(**recipe, calibration=count_samples(batches)),
                             progress=False, first_block_input=w.first_block_input)  # fmt: skip
    return model, {"tensors": quantized(model), "sqnr": {r.name: r.sqnr_db for r in res.layers},
                   "methods": {r.name: r.method for r in res.layers}, "recipe": res.recipe}  # fmt: skip


def workloads(llama: str):
    """(name, workload, calibration batches, cases) of the two models."""
    from numcast.workloads import load_workload

    fm, ll = load_workload("fmnist-cnn"), load_workload(llama)
    return [("fmnist-cnn", fm, fm.calibration(CALIBRATION["fmnist-cnn"]), FMNIST),
            ("llama", ll, ll.calibration(CALIBRATION["llama"]), LLAMA)]  # fmt: skip


def tiny_block() -> tuple[nn.Module, list[torch.Tensor]]:
    """A two-layer MLP block and three input batches (seeded generator)."""
    g = torch.Generator().manual_seed(3)
    block = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return block, [torch.randn(8, 16, generator=g) for _ in range(3)]


def round_block_same_data(sync: bool) -> dict:
    """Attention Round's block reconstruction on the same data on every rank, with the DDP hooks (``sync``):
    averaging identical gradients changes nothing, so it must equal one process bit for bit."""
    from numcast.algorithms.attention_round import round_block
    from numcast.pipeline import distributed

    block, xs = tiny_block()
    with torch.no_grad():
        targets = [block(x) + 0.01 for x in xs]
    hooks = dict(reduce_grads=distributed.average_gradients, stop_together=distributed.any_rank) if sync else {}
    got = round_block(block, [("0", block[0], "int4_channel"), ("2", block[2], "int4_channel")],
                      lambda i: ((xs[i],), {}), targets, iterations=25, lr=5e-2, sigma_start=0.5, sigma_end=0.01,
                      time_budget_s=600, **hooks)  # fmt: skip
    return {k: (q.codes, q.scale_codes) for k, q in got.items()}


def tiny_cnn() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def qat_data(n: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 4, (n,), generator=g)
    images = torch.randn(n, 1, 8, 8, generator=g) * 0.5
    images[torch.arange(n), 0, labels * 2, :] += 2.0
    return images, labels


def qat() -> dict:
    """A2Q+ QAT of a CNN with batch norm: 6 steps of a global batch of 30 (two ranks: 15 samples each)."""
    from numcast.training.qat import QATConfig, prepare_a2q, train_qat

    images, labels = qat_data()
    model = prepare_a2q(tiny_cnn(), images[:64], accumulator_bits=14, weight_bits=4, input_bits=4)
    res = train_qat(model, images, labels, QATConfig(epochs=2, steps_per_epoch=3, batch_size=30, lr=1e-2,
                                                     progress=False))  # fmt: skip
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()}, "losses": res.losses}


def one_process_cases(llama: str, out: Path) -> dict:
    """What one process computes for every case compared with the ranks; also fmnist-cnn with GPTQ, written to
    ``out`` as ``numcast quantize`` would (``model.safetensors``), for the torchrun command-line run."""
    from numcast.pipeline.export import save_quantized

    got: dict = {}
    for name, w, batches, cases in workloads(llama):
        for key, recipe in cases.items():
            got[key] = quantize_case(w, batches, recipe)[1]
        if name == "fmnist-cnn":
            model, res = quantize_case(w, batches, dict(weights="int4_channel", method="gptq"))
            save_quantized(model, out, w.name, res["recipe"])
            got["fm_gptq"], got["fm_gptq_dir"] = res, out
    got["ar_same_data"] = round_block_same_data(sync=False)
    got["qat"] = qat()
    return got


def _errors(fm, batches: list) -> dict:
    """The errors every rank must raise together, the group staying usable."""
    from numcast.pipeline import distributed

    got = {}
    me = distributed.rank_info().rank
    for key, cal in (("mismatch", batches[: len(batches) - me]), ("too_few", batches[:1])):
        try:
            quantize_case(fm, cal, FMNIST["fm_ed_static"])
        except ValueError as exc:
            got[key] = str(exc)

    def work():
        raise ValueError("the owner's solve failed")

    try:
        distributed.on_owner(1, work)
    except Exception as exc:  # noqa: BLE001 - the test reads the type and message
        got["owner"] = f"{type(exc).__name__}: {exc}"
    return got


def _rank_failure(fm, batches: list) -> dict:
    """Rank 1 fails inside the runner (its statistics raise): both ranks must raise, promptly."""
    from numcast.pipeline import distributed
    from numcast.pipeline.layer_stats import GramStatistics

    if distributed.rank_info().rank == 1:

        def add(*args, **kwargs):
            raise RuntimeError("injected failure on rank 1")

        GramStatistics.add = add
    t0 = time.perf_counter()
    try:
        quantize_case(fm, batches, FMNIST["fm_ed_static"])
    except Exception as exc:  # noqa: BLE001 - the test reads the type and message
        return {"error": f"{type(exc).__name__}: {exc}", "seconds": time.perf_counter() - t0}
    return {"error": None, "seconds": time.perf_counter() - t0}


def main(llama: str, out: Path) -> None:
    import torch.distributed as dist

    from numcast.pipeline import distributed

    dist.init_process_group("gloo")  # torchrun's environment
    me = distributed.rank_info()
    got: dict = {"world_size": me.world_size}
    (_, fm, fm_batches, _), *_ = every = workloads(llama)
    for _, w, batches, cases in every:
        for key, recipe in cases.items():
            got[key] = quantize_case(w, batches, recipe)[1]
    got["ar_runner"] = quantize_case(fm, fm_batches, AR)[1]
    got["ar_same_data"] = round_block_same_data(sync=True)
    got["qat"] = qat()
    got["errors"] = _errors(fm, fm_batches)
    got["rank_failure"] = _rank_failure(fm, fm_batches)  # last: it tears the group down
    for v in got.values():
        if isinstance(v, dict):
            v.pop("recipe", None)
    torch.save(got, out / f"rank{me.rank}.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], Path(sys.argv[2]))
