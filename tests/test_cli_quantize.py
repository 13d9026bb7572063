"""`numcast quantize` / `numcast evaluate` end to end on a tiny registered workload (the real-model adapters
are tested in tests/models): files, report fields, refusals, bit-exact reload."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from numcast import workloads as registry
from numcast.cli import main
from numcast.workloads import Workload


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = nn.Sequential(nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.ReLU()),
                                    nn.Sequential(nn.Conv2d(16, 32, 1), nn.ReLU()))  # fmt: skip
        self.norm = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.eval()

    def forward(self, x):
        return self.fc(self.norm(self.blocks(self.stem(x))).mean((2, 3)))


def tiny_workload() -> Workload:
    from numcast.evaluate.vision import agreement_and_kl, logits_of

    model = Net()
    images = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = logits_of(model, images)

    class Head(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.norm, self.fc = m.norm, m.fc

        def forward(self, x):
            return self.fc(self.norm(x).mean((2, 3)))

    def calibration(n):
        x = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(2))
        return [x[i : i + 8] for i in range(0, n, 8)]

    def evaluate(m):
        return agreement_and_kl(ref, logits_of(m, images))

    blocks = lambda m: [m.stem, *m.blocks, Head(m)]  # noqa: E731
    return Workload("tiny-cnn", model, blocks, calibration, evaluate, "top1_agreement", True, "a tiny CNN")


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(registry.LOADERS, "tiny-cnn", tiny_workload)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_writes_everything_and_evaluate_reloads_bit_exactly(tiny, tmp_path, capsys, method):
    out = tmp_path / "q"
    argv = ["quantize", "tiny-cnn", "--weights", "int4_g32", "--activations", "mxfp8_e4m3", "--method", method,
            "--calibration", "16", "--out", str(out), "--no-progress"]  # fmt: skip
    if method == "rtn":  # weight-only RTN runs without a calibration pass unless asked to measure the SQNR
        argv += ["--sqnr-samples", "16"]
    assert main(argv) == 0
    assert "top1_agreement" in capsys.readouterr().out
    rec = json.loads((out / "report.json").read_text())
    for key in ("model", "recipe", "metrics", "size_bytes", "bits_per_param", "wall_time_s", "peak_rss_mb",
                "peak_rss_mb_by_phase", "layers"):
        assert key in rec
    assert rec["metrics"]["float"]["top1_agreement"] == 1.0
    assert rec["size_bytes"]["packed"] < rec["size_bytes"]["float"]
    layers = {r["name"]: r for r in rec["layers"]}
    assert layers["norm"]["action"] == "skipped" and "float" in layers["norm"]["reason"]
    assert layers["blocks.0.0"]["method"] == method and layers["blocks.0.0"]["sqnr_db"] > 0
    assert (out / "sqnr.png").stat().st_size > 1000 and (out / "recipe.yaml").is_file()
    assert main(["evaluate", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["measured"] == rec["metrics"]["quantized"]  # bit-exact reload: identical metrics
    assert main(argv) == 2  # out exists: refused
    assert "--overwrite" in capsys.readouterr().out


def test_weight_only_rtn_needs_no_calibration_pass(tiny, tmp_path, capsys):
    """The same weights with and without the SQNR sample (RTN ignores the data); no calibration pass by default;
    --sqnr-samples refused where it would do nothing."""
    from safetensors.torch import load_file

    base = ["quantize", "tiny-cnn", "--weights", "int4_g32", "--calibration", "16", "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert "no per-layer SQNR" in capsys.readouterr().out
    assert main([*base, "--sqnr-samples", "8", "--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / d / "report.json").read_text()) for d in "ab")
    assert a["calibration_samples_used"] == 0 and b["calibration_samples_used"] == 8
    assert all(r.get("sqnr_db") is None for r in a["layers"]) and not (tmp_path / "a" / "sqnr.png").exists()
    assert any(r.get("sqnr_db") is not None for r in b["layers"])
    ta, tb = (load_file(tmp_path / d / "model.safetensors") for d in "ab")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert a["metrics"]["quantized"] == b["metrics"]["quantized"]
    assert main([*base, "--method", "gptq", "--sqnr-samples", "8", "--out", str(tmp_path / "c")]) == 2
    assert "--sqnr-samples does nothing" in capsys.readouterr().out


def test_mixed_precision_flags_end_to_end_report_formats_and_size(tiny, tmp_path, capsys):
    out = tmp_path / "mp"
    cands = ["int2_g64", "int4_g128", "int8_channel"]
    argv = ["quantize", "tiny-cnn", "--weights", "int4_g128", "--mixed-precision", "lcl", "--candidates",
            ",".join(cands), "--budget", "3.8bits", "--calibration", "16", "--out", str(out),
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    rec = json.loads((out / "report.json").read_text())
    chosen = {r["name"]: r["weight_format"] for r in rec["layers"] if r["action"] == "quantized"}
    assert set(chosen.values()) <= set(cands) and len(set(chosen.values())) >= 2
    assert rec["bits_per_param"] <= 3.8
    capsys.readouterr()
    assert main(["evaluate", str(out), "--json"]) == 0  # the saved recipe replays the per-layer formats
    assert json.loads(capsys.readouterr().out)["measured"] == rec["metrics"]["quantized"]


def test_quantize_refusals(tiny, tmp_path, capsys):
    assert main(["quantize", "tiny-cnnn", "--weights", "mxfp4", "--out", str(tmp_path / "a")]) == 2
    assert "known models" in capsys.readouterr().out
    assert main(["quantize", "tiny-cnn", "--weights", "mxfp5", "--out", str(tmp_path / "b")]) == 2
    assert "closest" in capsys.readouterr().out
    assert main(["quantize", "tiny-cnn", "--weights", "mxfp4", "--calibration", "0", "--out", str(tmp_path / "c")]) == 2
    assert "empty" in capsys.readouterr().out
    assert main(["quantize", "tiny-cnn", "--out", str(tmp_path / "d")]) == 2
    assert "--weights" in capsys.readouterr().out


def test_recipe_file_and_flags(tiny, tmp_path, capsys):
    from numcast.pipeline.recipe import Recipe

    Recipe(weights="int8_channel", exclude=["fc"]).save(tmp_path / "r.yaml")
    out = tmp_path / "q"
    assert main(["quantize", "tiny-cnn", "--recipe", str(tmp_path / "r.yaml"), "--weights", "mxfp4",
                 "--calibration", "8", "--out", str(out), "--no-progress", "--json"]) == 0  # fmt: skip
    rec = json.loads(capsys.readouterr().out)
    assert rec["recipe"]["weights"] == "mxfp4" and rec["recipe"]["exclude"] == ["fc"]
    assert main(["quantize", "tiny-cnn", "--weights", "mxfp4", "--method", "error-diffusion", "--ed-scale-rule",
                 "dynamic", "--ed-order", "natural", "--ed-calibrate-float-layers", "--no-ed-rtn-guard", "--ed-damp",
                 "0.02", "--exclude", "blocks.1.*",
                 "--calibration", "8", "--out", str(tmp_path / "ed"), "--no-progress", "--json"]) == 0  # fmt: skip
    rec = json.loads(capsys.readouterr().out)
    assert rec["recipe"]["error_diffusion"] == {"scale_rule": "dynamic", "order": "natural",
                                                "calibrate_float_layers": True, "rtn_guard": False,
                                                "damp": 0.02}  # fmt: skip


def test_corrupted_packed_model_names_the_file(tiny, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "tiny-cnn", "--weights", "mxfp4", "--calibration", "8", "--out", str(out),
                 "--no-progress"]) == 0  # fmt: skip
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    capsys.readouterr()
    assert main(["evaluate", str(out)]) == 2
    assert "model.safetensors" in capsys.readouterr().out


def test_demo_quantizes_a_model_and_only_replaces_its_own_output(tiny, tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--model", "tiny-cnn", "--calibration", "8", "--out", str(out)]
    assert main(argv) == 0
    assert "top1_agreement" in capsys.readouterr().out and (out / "report.json").is_file()
    assert main(argv) == 0  # its own previous output: replaced
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("user data")
    assert main(["demo", "--model", "tiny-cnn", "--calibration", "8", "--out", str(mine)]) == 2
    assert (mine / "notes.txt").read_text() == "user data"


def test_report_peak_memory_by_phase(tiny, tmp_path):
    from numcast.jobs import run_ptq
    from numcast.pipeline.recipe import Recipe

    rec = run_ptq("tiny-cnn", Recipe(weights="mxfp4", calibration=8), tmp_path / "q", progress=False)
    phases = rec["peak_rss_mb_by_phase"]
    assert list(phases) == ["load", "evaluate_float", "calibration", "quantize", "evaluate_quantized", "export"]
    assert rec["peak_rss_mb"] == max(phases.values()) and all(v > 0 for v in phases.values())
