"""Recipes: validation, per-layer resolution, YAML/JSON round trips."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from numcast.pipeline.recipe import Recipe


def test_unknown_format_and_field_fail_early_with_reasons():
    with pytest.raises(ValidationError, match="closest: mxfp4"):
        Recipe(weights="mxfp5")
    with pytest.raises(ValidationError, match="extra"):
        Recipe(weights="mxfp4", wieghts="x")
    with pytest.raises(ValidationError, match="calibration"):
        Recipe(weights="mxfp4", method="gptq", calibration=0)
    with pytest.raises(ValidationError):
        Recipe(weights="mxfp4", method="magic")


def test_layer_settings_include_exclude_overrides():
    r = Recipe(
        weights="int4_g128",
        activations="mxfp8_e4m3",
        include=["encoder.*"],
        exclude=["*.pooler*"],
        overrides=[
            {"pattern": "*.attn.*", "weights": "mxfp6_e2m3"},
            {"pattern": "*.attn.out", "skip": True},
        ],
    )
    assert r.layer_settings("decoder.fc") == (None, None, "not matched by include")
    assert r.layer_settings("encoder.pooler.dense")[2] == "matched by exclude"
    assert r.layer_settings("encoder.0.attn.q") == ("mxfp6_e2m3", "mxfp8_e4m3", None)
    assert r.layer_settings("encoder.0.attn.out")[2].startswith("skipped by override")
    assert r.layer_settings("encoder.0.mlp.fc1") == ("int4_g128", "mxfp8_e4m3", None)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_save_load_round_trip_and_refusals(tmp_path, suffix):
    r = Recipe(
        weights="nvfp4",
        activations="int8_tensor",
        activation_mode="static",
        overrides=[{"pattern": "x*", "skip": True}],
    )
    p = tmp_path / f"r{suffix}"
    r.save(p)
    assert Recipe.load(p) == r
    with pytest.raises(FileExistsError):
        r.save(p)
    with pytest.raises(ValueError, match="yaml"):
        r.save(tmp_path / "r.toml")
    with pytest.raises(FileNotFoundError):
        Recipe.load(tmp_path / "missing.yaml")
    bad = tmp_path / f"bad{suffix}"
    bad.write_text('["not", "a", "mapping"]')
    with pytest.raises(ValueError, match="mapping"):
        Recipe.load(bad)
