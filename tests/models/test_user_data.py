"""The user's own calibration and evaluation data: readers (text, images with and without labels, tensors) with
clear errors, and `quantize --calibration-data/--eval-data` measuring on that data, recorded in the report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import tiny_llama_folder
from PIL import Image
from test_cli_quantize import tiny  # noqa: F401  (fixture: the tiny-cnn workload)

from numcast.cli import main
from numcast.models.user_data import load_user_data


def test_text_readers(tmp_path):
    (tmp_path / "a.txt").write_text("first text")
    d = tmp_path / "docs"
    d.mkdir()
    (d / "2.txt").write_text("second")
    (d / "1.txt").write_text("first")
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert load_user_data(tmp_path / "a.txt").texts == ["first text"]
    assert load_user_data(d).texts == ["first", "second"]  # sorted by file name
    data = load_user_data(tmp_path / "t.jsonl")
    assert data.texts == ["one", "two"] and data.record()["count"] == 2 and len(data.record()["sha256"]) == 64


@pytest.mark.parametrize(
    "name, content, msg",
    [
        ("bad.jsonl", '{"txt": "no text field"}\n', "line 1 has no string field 'text'"),
        ("empty.txt", "   \n", "no text in it"),
        ("w.pt", b"not a pickle", "not a readable tensor file"),
        ("w.csv", "a,b", "unsupported data"),
    ],
)
def test_bad_data_is_named(tmp_path, name, content, msg):
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=msg):
        load_user_data(p)
    with pytest.raises(FileNotFoundError, match="no such data"):
        load_user_data(tmp_path / "missing.txt")


def _png(path, seed, size=(20, 24)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)


def test_image_folders_with_and_without_labels_and_tensors(tmp_path):
    for c in ("cat", "ant"):
        (tmp_path / "lab" / c).mkdir(parents=True)
        for i in range(2):
            _png(tmp_path / "lab" / c / f"{i}.png", hash((c, i)) % 1000)
    data = load_user_data(tmp_path / "lab")
    assert data.kind == "images" and data.classes == ["ant", "cat"] and data.labels.tolist() == [0, 0, 1, 1]
    (tmp_path / "flat").mkdir()
    _png(tmp_path / "flat" / "x.png", 1)
    assert load_user_data(tmp_path / "flat").labels is None
    (tmp_path / "flat" / "broken.png").write_bytes(b"no image")
    with pytest.raises(ValueError, match="broken.png: not a readable image"):
        load_user_data(tmp_path / "flat")
    torch.save({"input_ids": torch.zeros(5, 3, dtype=torch.long), "mask": torch.ones(4, 3)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="samples along dimension 0"):
        load_user_data(tmp_path / "x.pt")
    torch.save(torch.randn(10, 3), tmp_path / "y.pt")
    t = load_user_data(tmp_path / "y.pt")
    assert t.count == 10 and [b.shape[0] for b in t.batches(7, 4)] == [4, 3]
    with pytest.raises(ValueError, match="holds 10 samples; 11 were asked for"):
        t.batches(11, 4)


def test_quantize_calibrates_and_measures_on_the_users_tensors(tiny, tmp_path, capsys):  # noqa: F811
    torch.save(torch.randn(24, 3, 8, 8, generator=torch.Generator().manual_seed(3)), tmp_path / "cal.pt")
    torch.save(torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(4)), tmp_path / "ev.pt")
    out = tmp_path / "q"
    assert main(["quantize", "tiny-cnn", "--weights", "int4_g32", "--method", "gptq", "--calibration", "24",
                 "--calibration-data", str(tmp_path / "cal.pt"), "--eval-data", str(tmp_path / "ev.pt"),
                 "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    rec = json.loads((out / "report.json").read_text())
    assert rec["primary_metric"] == "output_cosine" and rec["metrics"]["float"]["output_cosine"] == pytest.approx(1)
    assert 0.5 < rec["metrics"]["quantized"]["output_cosine"] < 1
    assert rec["data"]["calibration"]["count"] == 24 and rec["data"]["evaluation"]["kind"] == "tensors"
    capsys.readouterr()
    assert main(["evaluate", str(out), "--eval-data", str(tmp_path / "ev.pt")]) == 0
    assert "bit-exact" in capsys.readouterr().out
    code = main(["quantize", "tiny-cnn", "--weights", "int4_g32", "--method", "gptq", "--calibration", "25",
                 "--calibration-data", str(tmp_path / "cal.pt"), "--out", str(tmp_path / "q2"), "--no-progress"])
    assert code == 2 and "holds 24 samples; 25 were asked for" in capsys.readouterr().out


def test_fmnist_measures_top1_on_a_labelled_image_folder(tmp_path):
    from numcast.evaluate.vision import accuracy
    from numcast.models.fashion_mnist import FASHION_MNIST_MEAN, FASHION_MNIST_STD, grayscale_28, load_fashion_mnist
    from numcast.models.fmnist_cnn import load_fmnist_cnn
    from numcast.workloads import load_workload

    x, y = load_fashion_mnist("test")
    for i in range(30):
        pixels = ((x[i, 0] * FASHION_MNIST_STD + FASHION_MNIST_MEAN) * 255).round().clamp(0, 255).byte().numpy()
        folder = tmp_path / "imgs" / str(int(y[i]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.stack([pixels] * 3, -1)).save(folder / f"{i}.png")
    w = load_workload("fmnist-cnn", eval_data=tmp_path / "imgs")
    data = load_user_data(tmp_path / "imgs")
    classes = [int(c) for c in data.classes]
    want = accuracy(load_fmnist_cnn(), grayscale_28(data.images), torch.tensor([classes[i] for i in data.labels]))
    got = w.evaluate(w.model)
    assert w.primary == "top1_accuracy" and got["top1_accuracy"] == pytest.approx(want) and got["top1_agreement"] == 1
    assert w.data["evaluation"]["labelled"] is True
    with pytest.raises(ValueError, match="takes images"):
        load_workload("fmnist-cnn", calibration_data=_text(tmp_path))


def _text(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("words " * 50)
    return p


def test_a_language_model_measures_perplexity_on_the_users_text(tmp_path):
    from numcast.evaluate.text import perplexity, token_windows
    from numcast.workloads import load_workload

    _, _, tok = tiny_llama_folder(tmp_path / "llm")
    text = " ".join(f"Sentence number {i} talks about quantization of networks." for i in range(600))
    (tmp_path / "held.txt").write_text(text)
    w = load_workload(str(tmp_path / "llm"), calibration_data=tmp_path / "held.txt", eval_data=tmp_path / "held.txt")
    n = min(8, len(tok(text).input_ids) // 511)
    assert n >= 2
    want = perplexity(w.model, token_windows(tok, [text], n, 512))
    first = w.evaluate(w.model)
    assert first["perplexity"] == pytest.approx(want)
    assert first["kl_divergence"] == 0.0 and first["top1_agreement"] == 1.0  # the float model is the reference
    assert w.calibration(2)[0]["input_ids"].shape == (2, 512)
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(ValueError, match="short.txt: too short for one evaluation window"):
        load_workload(str(tmp_path / "llm"), eval_data=tmp_path / "short.txt")


def test_a_language_models_fidelity_refers_to_the_float_model_measured_first(tmp_path):
    """KL divergence and top-1 agreement compare with the first model evaluated: a quantized one first is refused
    (it would be its own reference); after the float model, RTN's distance is positive."""
    from numcast.pipeline.data_free import quantize_data_free
    from numcast.pipeline.recipe import Recipe
    from numcast.workloads import load_workload

    tiny_llama_folder(tmp_path / "llm")
    w = load_workload(str(tmp_path / "llm"))
    quantized = quantize_data_free(w.model, Recipe(weights="int2_g32")).model
    with pytest.raises(ValueError, match="evaluate the float model first"):
        w.evaluate(quantized)
    assert w.evaluate(w.model)["kl_divergence"] == 0.0
    got = w.evaluate(quantized)
    assert got["kl_divergence"] > 0.0 and 0.0 <= got["top1_agreement"] <= 1.0
