"""Resuming a stopped training run (pipeline/runtime/resume.py)."""

import pytest
import torch

from pipeline.runtime.resume import load_run_state, run_differences


def test_the_saved_state_of_the_same_run_comes_back_and_none_without_one(tmp_path):
    path = tmp_path / "out" / ".training" / "state.pt"
    assert load_run_state(path, {"settings": {"epochs": 2}}, "a training") is None
    path.parent.mkdir(parents=True)
    torch.save({"run": {"settings": {"epochs": 2}}, "weights": torch.ones(3)}, path)
    state = load_run_state(path, {"settings": {"epochs": 2}}, "a training")
    assert torch.equal(state["weights"], torch.ones(3))


def test_another_run_is_refused_naming_each_difference(tmp_path):
    path = tmp_path / "out" / ".training" / "state.pt"
    path.parent.mkdir(parents=True)
    torch.save({"run": {"settings": {"epochs": 2, "seed": 0}, "images": ["a", "b"]}}, path)
    with pytest.raises(FileExistsError, match=r"out holds a training with other settings .*settings.epochs: 2 → 3"):
        load_run_state(path, {"settings": {"epochs": 3, "seed": 0}, "images": ["a", "b"]}, "a training")
    assert run_differences({"images": ["a"], "x": 1}, {"images": ["a", "b"], "x": 1}) == ["images: '1 images' → '2 images'"]
