"""`numcast accumulator` end to end on the tiny registered workload: an accumulator-aware model never overflows
its P, the same model in RTN does (worst case), real inputs are simulated, files are not replaced unasked."""

from __future__ import annotations

import json

import pytest
from test_cli_quantize import tiny  # noqa: F401  (fixture)

from numcast.cli import main


def _run(capsys, argv):
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("rule", ["a2q", "a2q+"])
def test_accumulator_aware_model_never_overflows_its_width(tiny, tmp_path, capsys, rule):  # noqa: F811
    out = tmp_path / "q"
    assert main(["quantize", "tiny-cnn", "--weights", "int4_channel", "--activations", "int4", "--method", "ep-init",
                 "--accumulator-bits", "12", "--accumulator-rule", rule, "--calibration", "16", "--out", str(out),
                 "--no-progress", "--json"]) == 0  # fmt: skip
    capsys.readouterr()
    rec = _run(capsys, ["accumulator", str(out), "--input-bits", "8", "--accumulator-bits", "12", "--samples", "16"])
    assert {r["name"] for r in rec["layers"]} == {"stem", "blocks.0.0", "blocks.1.0", "fc"}
    for r in rec["layers"]:
        assert r["input_from"] == "layer quantizer" and r["input"] in ("int4", "uint4")
        assert r["exact_bits"] <= 12 and r["channels_overflowing_adversarial"] == 0
        assert r["overflows_real"] == 0 and r["dot_products"] > 0
    assert (out / "accumulator.png").stat().st_size > 1000
    assert main(["accumulator", str(out), "--input-bits", "8", "--accumulator-bits", "12"]) == 2  # files exist
    assert "--overwrite" in capsys.readouterr().out


def test_rtn_model_overflows_in_the_worst_case_and_on_real_inputs(tiny, tmp_path, capsys):  # noqa: F811
    args = ["accumulator", "tiny-cnn", "--weights", "int8_channel", "--input-bits", "8", "--samples", "16"]
    wide = _run(capsys, [*args, "--accumulator-bits", "32", "--out", str(tmp_path / "a")])
    assert all(r["channels_overflowing_adversarial"] == 0 and r["overflows_real"] == 0 for r in wide["layers"])
    need = max(r["exact_bits"] for r in wide["layers"])
    tight = _run(capsys, [*args, "--accumulator-bits", str(need - 1), "--out", str(tmp_path / "b")])
    assert any(r["channels_overflowing_adversarial"] > 0 for r in tight["layers"])
    narrow = _run(capsys, [*args, "--accumulator-bits", "10", "--out", str(tmp_path / "c"), "--mode", "saturate"])
    assert any(r["overflows_real"] > 0 and r["dot_products_overflowing"] > 0 for r in narrow["layers"])
    signs = {r["name"]: r["input"] for r in wide["layers"]}
    assert signs["stem"] == "int8" and signs["blocks.1.0"] == "uint8"  # the image is signed, post-ReLU is not


def test_a_model_with_no_integer_sum_layer_is_an_error_not_a_proof(tiny, tmp_path, capsys):  # noqa: F811
    code = main(["accumulator", "tiny-cnn", "--weights", "mxfp4", "--input-bits", "8", "--accumulator-bits", "16",
                 "--out", str(tmp_path / "m")])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 2 and "no layer could be analysed" in out and "not integers with one scale" in out
    assert not (tmp_path / "m" / "accumulator.json").exists()


def test_tiled_analysis_needs_fewer_inner_bits_and_the_simulator_agrees(tiny, tmp_path, capsys):  # noqa: F811
    args = ["accumulator", "tiny-cnn", "--weights", "int8_channel", "--input-bits", "8", "--samples", "8",
            "--accumulator-bits", "32", "--tile", "16"]  # fmt: skip
    flat = _run(capsys, [*args, "--tile-bits", "32", "--out", str(tmp_path / "a")])
    inner = max(r["tile_bits_needed"] for r in flat["layers"])
    assert all(r["tile_bits_needed"] <= r["exact_bits"] for r in flat["layers"])
    assert any(r["tile_bits_needed"] < r["exact_bits"] for r in flat["layers"] if r["K"] > 16)  # fewer products
    ok = _run(capsys, [*args, "--tile-bits", str(inner), "--out", str(tmp_path / "b")])
    assert all(r["channels_overflowing_adversarial"] == 0 for r in ok["layers"])
    short = _run(capsys, [*args, "--tile-bits", str(inner - 1), "--out", str(tmp_path / "c")])
    assert any(r["channels_overflowing_adversarial"] > 0 for r in short["layers"])
