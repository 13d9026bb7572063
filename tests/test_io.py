"""numcast.io: output directories replace only what numcast wrote (or an empty directory), atomically."""

from __future__ import annotations

import pytest

from numcast.io import MARKER, OutputDir


def test_output_dir_replaces_an_empty_directory_and_its_own_outputs_only(tmp_path):
    out = tmp_path / "out"
    out.mkdir()  # empty: accepted
    with OutputDir(out) as d:
        (d.tmp / "a.txt").write_text("1")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "a.txt"]
    with OutputDir(out, overwrite=True) as d:  # an earlier numcast output: replaced whole
        (d.tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old sibling left
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "x").write_text("keep")
    with pytest.raises(FileExistsError, match="not written by numcast"):
        OutputDir(tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "x").read_text() == "keep"


def test_a_failing_run_leaves_the_previous_output(tmp_path):
    out = tmp_path / "out"
    with OutputDir(out) as d:
        (d.tmp / "a.txt").write_text("1")
    with pytest.raises(RuntimeError), OutputDir(out, overwrite=True) as d:
        (d.tmp / "b.txt").write_text("2")
        raise RuntimeError("the run failed")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
