"""lm-evaluation-harness on a numcast model, offline: a custom task over a local jsonl written here, run by
`numcast evaluate --lm-eval` on the float and the reloaded quantized model, and by `run_lm_eval` directly."""

from __future__ import annotations

import json

import pytest
from helpers import tiny_llama_folder

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -c constraints.txt -e '.[eval]')")

from numcast.cli import main  # noqa: E402
from numcast.evaluate.lm_eval import run_lm_eval  # noqa: E402

ITEMS = [("The capital of France is", ["Paris", "Rome"], 0), ("Two plus two is", ["five", "four"], 1),
         ("Water freezes at zero degrees", ["Celsius", "Kelvin"], 0)]  # fmt: skip


@pytest.fixture
def task_dir(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in ITEMS))
    d = tmp_path / "tasks"
    d.mkdir()
    (d / "qa.yaml").write_text(f"""task: numcast_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return d


@pytest.fixture
def llama_folder(tmp_path):
    return tiny_llama_folder(tmp_path / "llm")


def test_run_lm_eval_scores_a_local_task(task_dir, llama_folder):
    _, model, tok = llama_folder
    res = run_lm_eval(model.eval(), tok, ["numcast_qa"], include_path=str(task_dir))
    assert set(res) == {"numcast_qa"} and 0.0 <= res["numcast_qa"]["acc"] <= 1.0
    with pytest.raises(ValueError, match="unknown lm-eval task"):
        run_lm_eval(model, tok, ["no_such_task"], include_path=str(task_dir))


def test_evaluate_runs_lm_eval_on_the_float_and_the_quantized_model(task_dir, llama_folder, tmp_path, capsys):
    folder, _, _ = llama_folder
    out = tmp_path / "q"
    assert main(["quantize", str(folder), "--weights", "int4_g32", "--method", "gptq", "--calibration", "2",
                 "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["evaluate", str(out), "--lm-eval", "numcast_qa", "--lm-eval-include", str(task_dir), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    for which in ("float", "quantized"):
        assert 0.0 <= res["lm_eval"][which]["numcast_qa"]["acc"] <= 1.0
