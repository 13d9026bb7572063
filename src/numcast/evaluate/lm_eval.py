"""lm-evaluation-harness (PyPI ``lm-eval``), the evaluation users of LLM quantizers expect, on a numcast model.

The quantized model is a normal ``transformers`` model with numcast's layers swapped in, so lm-eval's own HF
wrapper (``lm_eval.models.huggingface.HFLM``) runs it as it is. lm-eval fetches its standard tasks' data from a
hub, which fails offline: point it at local data with a task YAML in a folder passed as ``include_path`` (the
``--lm-eval-include`` flag), for example::

    task: my_task
    dataset_path: json
    dataset_kwargs: {data_files: {test: /data/my_task.jsonl}}
    test_split: test
    output_type: multiple_choice
    doc_to_text: "{{question}}"
    doc_to_choice: "{{choices}}"
    doc_to_target: "{{answer}}"
    metric_list: [{metric: acc}]
"""

from __future__ import annotations

import math
import os

from torch import nn


def run_lm_eval(model: nn.Module, tokenizer, tasks: list[str], *, include_path: str | None = None,
                batch_size: int = 1, limit: int | None = None) -> dict[str, dict[str, float]]:  # fmt: skip
    """{task: {metric: value}} of ``model`` on lm-eval ``tasks`` (``include_path``: a folder of task YAMLs;
    ``limit``: at most this many documents per task)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise RuntimeError("lm-eval is not installed: pip install -c constraints.txt -e '.[eval]'") from exc
    if not tasks:
        raise ValueError("name at least one lm-eval task")
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" (nor in {include_path})" if include_path else " (pass --lm-eval-include DIR for local task YAMLs)"
        raise ValueError(f"unknown lm-eval task(s) {', '.join(unknown)}{where}")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(_device(model)))
    res = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, log_samples=False)
    out: dict[str, dict[str, float]] = {}
    for task, metrics in res["results"].items():
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        out[task] = {k.removesuffix(",none"): v for k, v in numbers.items() if math.isfinite(v)}
    return out


def _device(model: nn.Module):
    p = next(model.parameters(), None)
    return p.device if p is not None else "cpu"
