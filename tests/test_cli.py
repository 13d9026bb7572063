"""The command line: formats, cast on every input type, refusals, and the main job on the shipped model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from numcast.cli import main
from numcast.formats.ops import cast
from numcast.formats.qtensor import QTensor
from numcast.formats.registry import list_formats


def test_formats_json_lists_every_format(capsys):
    assert main(["formats", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["name"] for d in data] == [f.name for f in list_formats()]
    mx = next(d for d in data if d["name"] == "mxfp4")
    assert mx["bits_per_value"] == 4.25 and mx["block_size"] == 32 and mx["scale_format"] == "e8m0"


def test_formats_table(capsys):
    assert main(["formats"]) == 0
    out = capsys.readouterr().out
    assert "nvfp4" in out and "fp8_e4m3" in out


@pytest.mark.parametrize("suffix", [".pt", ".npy", ".safetensors"])
def test_cast_every_input_type_and_write_packed(tmp_path, capsys, suffix):
    x = torch.randn(16, 64)
    src = tmp_path / f"w{suffix}"
    if suffix == ".pt":
        torch.save(x, src)
    elif suffix == ".npy":
        np.save(src, x.numpy())
    else:
        save_file({"w": x}, str(src))
    out = tmp_path / "q.safetensors"
    assert main(["cast", str(src), "--format", "mxfp4", "--out", str(out), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)[0]
    ref = cast(x, "mxfp4")
    assert rec["mse"] == pytest.approx(float((ref.double() - x.double()).square().mean()))
    assert rec["packed_bytes"] == 16 * 64 // 2 + 16 * 2
    assert torch.equal(QTensor.load(out).dequantize(), ref)
    assert main(["cast", str(src), "--format", "mxfp4", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().out
    assert main(["cast", str(src), "--format", "mxfp4", "--out", str(out), "--overwrite"]) == 0


def test_cast_errors_are_clear(tmp_path, capsys):
    src = tmp_path / "w.pt"
    torch.save({"a": torch.randn(4, 32), "b": torch.randn(4, 32), "i": torch.arange(3)}, src)
    assert main(["cast", str(src), "--format", "mxfp5"]) == 2
    assert "closest" in capsys.readouterr().out
    assert main(["cast", str(src), "--format", "mxfp4", "--out", str(tmp_path / "o.safetensors")]) == 2
    assert "--key" in capsys.readouterr().out
    assert main(["cast", str(src), "--format", "mxfp4", "--key", "zz"]) == 2
    assert "no tensor named" in capsys.readouterr().out
    assert main(["cast", str(tmp_path / "missing.pt"), "--format", "mxfp4"]) == 2
    (tmp_path / "w.txt").write_text("1 2 3")
    assert main(["cast", str(tmp_path / "w.txt"), "--format", "mxfp4"]) == 2
    assert "unsupported" in capsys.readouterr().out


def test_cast_counts_non_finite(tmp_path, capsys):
    x = torch.randn(2, 32)
    x[0, 1] = float("nan")
    src = tmp_path / "w.pt"
    torch.save(x, src)
    assert main(["cast", str(src), "--format", "mxfp8_e4m3", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)[0]
    assert rec["nan_in"] == 1 and rec["nan_out"] == 32  # the whole block of the NaN


def test_demo_casts_the_shipped_mobilenet_weight(tmp_path, capsys):
    js = tmp_path / "demo.json"
    assert main(["demo", "--json-out", str(js), "--model", ""]) == 0
    out = capsys.readouterr().out
    assert "MobileNetV2" in out and "[1000, 1280]" in out
    recs = json.loads(js.read_text())
    by = {r["format"]: r for r in recs}
    assert by["mxfp4"]["packed_bytes"] == 1000 * 1280 // 2 + 1000 * 40
    # more bits, less error: a property of the real weights that a broken cast would violate
    assert by["mxfp8_e4m3"]["sqnr_db"] > by["mxfp6_e2m3"]["sqnr_db"] - 3 > by["mxfp4"]["sqnr_db"]
    assert by["int8_channel"]["sqnr_db"] > by["int4_channel"]["sqnr_db"] > by["int3_channel"]["sqnr_db"]
