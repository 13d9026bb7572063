"""torch.distributed: N ranks give one process's quantized tensors bit for bit (GPTQ, Error Diffusion, static
input scales, float layers re-fitted; fmnist-cnn and a tiny random Llama), Attention Round and QAT average their
gradients over the ranks, errors reach every rank and a failing rank stops the group without a hang.

The multi-rank runs use ``torchrun --nproc-per-node 2 --standalone`` on gloo (CPU): once the command line
(``python -m numcast quantize``), once the Python API inside a process group (``distributed_cases.py``, whose
cases the one-process references run here too). Every process computes with one thread."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import assert_bitwise, tiny_llama_folder
from safetensors.torch import load_file

from numcast.pipeline import distributed
from numcast.pipeline.layer_stats import GramStatistics, HessianStatistics

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def torchrun(args: list[str], cwd: Path, timeout: float = 300) -> tuple[int, str, float]:
    """``torchrun --nproc-per-node 2 --standalone ARGS``: (exit code, output, seconds); on a timeout the whole
    process group is killed and the test fails (a hang)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", *args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"torchrun {' '.join(args)} hung for {timeout} s")
    return proc.returncode, out, time.perf_counter() - t0


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> str:
    return str(tiny_llama_folder(tmp_path_factory.mktemp("llama"))[0])


@pytest.fixture(scope="module")
def one(llama, tmp_path_factory) -> dict:
    """Every case in this process (no process group), with one thread as each rank."""
    from distributed_cases import one_process_cases

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got = one_process_cases(llama, tmp_path_factory.mktemp("fm_gptq"))
    finally:
        torch.set_num_threads(threads)
    return got


@pytest.fixture(scope="module")
def ranks(llama, tmp_path_factory) -> list[dict]:
    """Every case on each of two ranks (the Python API in a process group)."""
    out = tmp_path_factory.mktemp("ranks")
    rc, log, _ = torchrun([str(HERE / "distributed_cases.py"), llama, str(out)], REPO)
    assert rc == 0, log[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for name in a:
        for x, y in zip(a[name] if isinstance(a[name], tuple) else (a[name],),
                        b[name] if isinstance(b[name], tuple) else (b[name],), strict=True):  # fmt: skip
            if isinstance(x, torch.Tensor):
                assert_bitwise(x.reshape(-1), y.reshape(-1), f"{what}: {name}")
            else:
                assert x == y, f"{what}: {name}"


# ---- one process: the helpers are the identity -----------------------------------------------------------------


def test_shares_are_contiguous_in_order_and_as_even_as_possible():
    assert distributed.shard_bounds(5, 2) == [0, 3, 5]
    assert distributed.shard_bounds(7, 3) == [0, 3, 5, 7]
    assert distributed.shard_bounds(2, 2) == [0, 1, 2]
    batches = [torch.zeros(128, 1), torch.zeros(128, 1), torch.zeros(44, 1)]
    assert distributed.samples_per_rank(batches, 2) == [256, 44]
    assert distributed.samples_per_rank([{"input_ids": torch.zeros(2, 8)}] * 3, 2) == [4, 2]


def test_without_a_process_group_everything_is_the_identity():
    assert not distributed.active() and distributed.rank_info() == distributed.Rank() and distributed.is_main()
    batches = [torch.ones(2, 3)]
    assert distributed.my_share(batches) is batches
    assert distributed.on_owner(5, lambda: "solved") == "solved"
    obj = {"a": torch.ones(2)}
    assert distributed.broadcast_object(obj, 0) is obj
    assert distributed.gather_in_order({"x": [1.0]}) == {"x": [1.0]}
    t = torch.ones(3, requires_grad=True)
    assert distributed.sum_with_grad(t) is t and distributed.any_rank(True) and not distributed.any_rank(False)
    with distributed.fail_together(), pytest.raises(ValueError):
        raise ValueError("no group: re-raised as it is")


@pytest.mark.parametrize("stats_cls", [HessianStatistics, GramStatistics])
@pytest.mark.parametrize("shares", [(5,), (2, 3), (1, 1, 3), (2, 2, 1)])
def test_a_fold_continued_across_parts_equals_one_fold_bit_for_bit(stats_cls, shares):
    """What reduce_statistics does across ranks, by hand: part 0 folds, later parts defer and resume from the
    previous part's state; any split of the batches gives the one-process sums exactly."""
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(24, 4)
    xs = [torch.randn(int(torch.randint(3, 40, (1,), generator=g)), 24, generator=g) * 10 for _ in range(5)]
    one = stats_cls()
    for x in xs:
        one.add(layer, x, x * 0.9)
    state, at = None, 0
    for k, n in enumerate(shares):
        part = stats_cls()
        if k:
            part.defer()
        for x in xs[at : at + n]:
            part.add(layer, x, x * 0.9)
        if k:
            part.resume(state)
        state, at = part.state(), at + n
    for key, value in one.state().items():
        if isinstance(value, torch.Tensor):
            assert_bitwise(state[key], value, key)
        else:
            assert state[key] == value, key


# ---- two ranks ---------------------------------------------------------------------------------------------------


def test_torchrun_command_line_matches_one_process_bit_for_bit(one, tmp_path):
    """``torchrun --nproc-per-node 2 -m numcast quantize fmnist-cnn ... --method gptq``: the packed model equals
    one process's tensor for tensor, rank 0 wrote it, and the report records the ranks and their shares."""
    out = tmp_path / "run"
    rc, log, _ = torchrun(["-m", "numcast", "quantize", "fmnist-cnn", "--weights", "int4_channel", "--method", "gptq",
                           "--calibration", "300", "--out", str(out), "--no-progress"], tmp_path)  # fmt: skip
    assert rc == 0, log[-4000:]
    got, ref = load_file(out / "model.safetensors"), load_file(one["fm_gptq_dir"] / "model.safetensors")
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k].dtype == ref[k].dtype and torch.equal(
            got[k].reshape(-1).view(torch.uint8), ref[k].reshape(-1).view(torch.uint8)
        ), k
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2 and report["calibration_samples_per_rank"] == [256, 44]
    assert {r["name"]: r.get("sqnr_db") for r in report["layers"]} == one["fm_gptq"]["sqnr"]
    assert report["metrics"]["quantized"]["top1_accuracy"] > 0.8
    assert not list(tmp_path.glob(".run.*"))  # no temporary output left by any rank


@pytest.mark.parametrize("case", ["fm_ed_static", "ll_gptq", "ll_ed"])
def test_python_api_in_a_process_group_matches_one_process_bit_for_bit(one, ranks, case):
    """Every rank ends with one process's quantized tensors (and re-fitted float weights), layer methods and
    per-layer SQNR, bit for bit."""
    for r, got in enumerate(ranks):
        assert got["world_size"] == 2
        assert_same_tensors(got[case]["tensors"], one[case]["tensors"], f"{case} rank {r}")
        assert got[case]["methods"] == one[case]["methods"]
        assert got[case]["sqnr"] == one[case]["sqnr"]
    if case == "ll_ed":
        assert any("re-fit" in m for m in one[case]["methods"].values() if m)


def test_attention_round_averages_its_gradients_over_the_ranks(one, ranks):
    """The same data on both ranks: averaged gradients are the one-process gradients, so the rounding is one
    process's bit for bit; through the runner (each rank its own batches) both ranks end identical."""
    for got in ranks:
        assert_same_tensors(got["ar_same_data"], one["ar_same_data"], "attention round, same data")
    assert_same_tensors(ranks[0]["ar_runner"]["tensors"], ranks[1]["ar_runner"]["tensors"], "attention round")
    assert {m for m in ranks[0]["ar_runner"]["methods"].values() if m and "outside" not in m} == {"attention-round"}


def test_qat_matches_one_process_with_the_same_global_batch(one, ranks):
    """Data-parallel A2Q+ QAT (each rank half of every batch, batch norm over the whole batch, gradients summed):
    the ranks stay identical and match one process within float tolerance."""
    a, b, ref = ranks[0]["qat"], ranks[1]["qat"], one["qat"]
    assert_same_tensors(a["state"], b["state"], "rank 0 vs rank 1")
    assert a["losses"] == b["losses"]
    torch.testing.assert_close(torch.tensor(a["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=1e-6)
    for k, v in ref["state"].items():
        if v.is_floating_point():
            torch.testing.assert_close(a["state"][k], v, rtol=1e-4, atol=1e-5, msg=k)
        else:
            assert torch.equal(a["state"][k], v), k


def test_errors_reach_every_rank_and_keep_the_group(ranks):
    """Different calibration sets, more ranks than batches, a solve failing on its owner: every rank raises
    (the owner its own error, the others its message) and the group goes on."""
    for r, got in enumerate(ranks):
        e = got["errors"]
        assert "different calibration sets" in e["mismatch"] and "rank 1: 2 batches, 256 samples" in e["mismatch"]
        assert "2 ranks but 128 calibration samples in 1 batch" in e["too_few"]
        want = "ValueError: the owner's solve failed" if r == 1 else "RuntimeError: rank 1 failed: ValueError"
        assert e["owner"].startswith(want)


def test_a_failing_rank_stops_the_group_without_a_hang(ranks):
    """Rank 1 fails inside the runner (Python API): it raises its own error, and rank 0's next collective fails
    at once (the group is torn down) instead of waiting for the timeout."""
    assert ranks[1]["rank_failure"]["error"] == "RuntimeError: injected failure on rank 1"
    assert "Connection closed by peer" in ranks[0]["rank_failure"]["error"]
    assert ranks[0]["rank_failure"]["seconds"] < 60


def test_a_failing_rank_stops_torchrun_with_its_message(tmp_path):
    """The command line under torchrun: rank 1 fails while quantizing; torchrun exits non-zero promptly, the
    failing rank's message is in the output, and no output directory is left."""
    script = tmp_path / "fail_on_rank_1.py"
    script.write_text(
        "import os, sys\n"
        "from numcast.pipeline.layer_stats import HessianStatistics\n"
        "if os.environ['RANK'] == '1':\n"
        "    def add(*args, **kwargs):\n"
        "        raise RuntimeError('injected failure on rank 1')\n"
        "    HessianStatistics.add = add\n"
        "from numcast.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    out = tmp_path / "run"
    rc, log, seconds = torchrun([str(script), "quantize", "fmnist-cnn", "--weights", "int4_channel", "--method",
                                 "gptq", "--calibration", "300", "--out", str(out), "--no-progress"], tmp_path,
                                timeout=180)  # fmt: skip
    assert rc != 0
    assert "numcast rank 1 of 2 failed: RuntimeError: injected failure on rank 1" in log
    assert not out.exists() and not list(tmp_path.glob(".run.*"))
    assert seconds < 120
