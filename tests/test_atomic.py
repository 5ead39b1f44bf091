"""Tests of pipeline/runtime/atomic.py: a target is replaced whole, or left as it was."""

import pytest

from pipeline.runtime.atomic import replaced_file, replaced_folder


def test_a_file_is_replaced_whole_or_left_as_it_was(tmp_path):
    target = tmp_path / "sub" / "state.pt"
    with replaced_file(target) as staging:
        staging.write_text("first")
        assert not target.exists()  # nothing visible until the body ends
    assert target.read_text() == "first"
    with pytest.raises(RuntimeError), replaced_file(target) as staging:
        staging.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "first"
    assert sorted(path.name for path in target.parent.iterdir()) == ["state.pt"]


def test_a_folder_is_replaced_whole_or_left_as_it_was(tmp_path):
    target = tmp_path / "ensemble"
    with replaced_folder(target) as staging:
        (staging / "a.json").write_text("1")
    assert [path.name for path in target.iterdir()] == ["a.json"]
    with replaced_folder(target) as staging:
        (staging / "b.json").write_text("2")
        assert (target / "a.json").is_file()  # the old folder stays until the new one is complete
    assert [path.name for path in target.iterdir()] == ["b.json"]
    with pytest.raises(RuntimeError), replaced_folder(target) as staging:
        (staging / "c.json").write_text("3")
        raise RuntimeError("failed mid-write")
    assert [path.name for path in target.iterdir()] == ["b.json"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ensemble"]  # no staging or retired folder left
