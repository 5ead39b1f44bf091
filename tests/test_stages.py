"""The DVC pipeline end to end, in a copy of the project with small settings."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import PROJECT_ROOT
from pipeline.store.reader import FeatureStore

SMALL_SETTINGS = {
    "demo": {"pool_images": 4, "train_images": 4, "test_images": 6},  # 6: 5-shot episodes need 6 faces
    "extract": {"steps": [50, 150], "batch_size": 4},
    "train": {"members": 2, "max_epochs": 5, "steps": [50, 150], "fast_min_steps": 20},
    "evaluate": {"pictures": 2},
    "refine": {"folds": 2, "iterations": 20},
    "fewshot": {"episodes": 2, "baseline_members": 2, "baseline_training_steps": 5},
    "learning_curve": {"budgets": [1, 4], "draws": 2, "members": 1},
}


def run(project: Path, *arguments: str) -> str:
    environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    completed = subprocess.run(
        [sys.executable, "-m", "dvc", *arguments], cwd=project, env=environment, capture_output=True, text=True
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed.stdout + completed.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    project = tmp_path_factory.mktemp("project")
    for name in ("pipeline", "stages"):
        shutil.copytree(PROJECT_ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(PROJECT_ROOT / name, project / name)
    shutil.copytree(PROJECT_ROOT / "data" / "checkpoints", project / "data" / "checkpoints")
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    for section, values in SMALL_SETTINGS.items():
        params[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    run(project, "init", "--no-scm", "-q")
    return project


@pytest.mark.slow
def test_repro_runs_everything_then_nothing_then_only_training(project):
    first = run(project, "repro")
    for source in ("ddpm", "ddpm-paper-taps", "random", "pixels"):
        assert f"Running stage 'evaluate@{source}'" in first
        metrics = json.loads((project / "data" / "results" / source / "metrics.json").read_text())
        assert 0.0 <= metrics["miou"] <= 1.0 and metrics["images"] == 6
    for source in ("ddpm", "random", "pixels"):
        assert (project / "data" / "stores" / f"{source}-train.zarr" / "zarr.json").is_file()
    for stage in ("demo_data", "random_model", "extract@ddpm-train", "extract@random-test", "extract_pixels@test",
                  "select", "train_selected", "train@ddpm-paper-taps", "train@random", "train@pixels", "refine_train",
                  "refine", "evaluate@synthetic", "synthetic_speed", "fewshot", "learning_curve", "compare"):
        assert f"Running stage '{stage}'" in first
    curve = json.loads((project / "data" / "learning_curve.json").read_text())
    assert set(curve["sources"]) == {"ddpm", "ddpm-paper-taps", "random", "pixels"}
    assert [row["draws"] for row in curve["sources"]["ddpm"]["by_budget"]] == [2, 1]  # 4 faces: all of them once
    # The headline ensemble trains on the selection, the paper-taps one on train.steps × train.blocks.
    features = {name: json.loads((project / "data" / "models" / f"ensemble-{name}" / "ensemble.json").read_text())["features"]
                for name in ("ddpm", "ddpm-paper-taps")}
    selection = json.loads((project / "data" / "selection" / "selection.json").read_text())
    assert (features["ddpm"]["steps"], features["ddpm"]["taps"]) == (selection["steps"], selection["taps"])
    assert features["ddpm-paper-taps"]["steps"] == [50, 150] and len(features["ddpm-paper-taps"]["taps"]) == 5
    comparison = json.loads((project / "data" / "metrics.json").read_text())
    assert set(comparison) >= {"miou", "miou_refined", "refinement_gain", "miou_paper_taps", "miou_random_weights",
                               "miou_pixels", "margin_over_paper_taps", "miou_synthetic", "synthetic_speedup",
                               "fewshot_miou_1shot", "fewshot_miou_5shot", "fewshot_prototype_miou_1shot",
                               "fewshot_ensemble_miou_1shot", "fewshot_random_init_miou_1shot"}
    per_class = json.loads((project / "data" / "per_class_iou.json").read_text())
    assert all("synthetic" in sources for sources in per_class.values())
    refined = json.loads((project / "data" / "results" / "ddpm-refined" / "metrics.json").read_text())
    assert refined["miou"] == comparison["miou_refined"] and refined["images"] == 6
    shown = run(project, "metrics", "show")
    assert "miou_paper_taps" in shown and "miou_random_weights" in shown and "miou_pixels" in shown

    second = run(project, "repro")
    assert "Running stage" not in second

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["steps"] = [150]
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    third = run(project, "repro")
    assert "Running stage 'train@ddpm-paper-taps'" in third and "Running stage 'evaluate@ddpm-paper-taps'" in third
    for untouched in ("extract", "random_model", "select", "train_selected", "evaluate@ddpm'", "refine", "evaluate@synthetic",
                      "fewshot"):
        assert f"Running stage '{untouched}" not in third

    # DVC knows a store by its zarr.json (not every chunk): a deleted store is rebuilt, the same
    # as before, so what reads it does not run again; a changed extraction setting re-runs it.
    shutil.rmtree(project / "data" / "stores" / "random-test.zarr")
    fourth = run(project, "repro")
    assert "Running stage 'extract@random-test'" in fourth and "Running stage 'evaluate@random'" not in fourth
    assert FeatureStore(project / "data" / "stores" / "random-test.zarr").done_mask().all()
    params["extract"]["seed"] += 1
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    changed = run(project, "status")
    assert "extract@ddpm-train" in changed and "extract@random-test" in changed and "extract_pixels" not in changed


def test_stages_write_only_inside_the_data_folder(tmp_path, monkeypatch):
    from stages import output_path

    monkeypatch.chdir(tmp_path)
    assert output_path("data/stores/train.zarr") == Path("data/stores/train.zarr")
    assert output_path(str(tmp_path / "data" / "models" / "ensemble")) == tmp_path / "data" / "models" / "ensemble"
    for escaping in ("/tmp/elsewhere", "data/../outside", "data/stores/../../..", "../data/x", "data", ".", "~/x"):
        with pytest.raises(ValueError, match=r"only inside .*data"):
            output_path(escaping)


def test_a_stage_given_a_path_outside_data_deletes_nothing(tmp_path, monkeypatch):
    import stages.demo_data

    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "keep.txt").write_text("mine")
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(PROJECT_ROOT / "params.yaml", project / "params.yaml")
    monkeypatch.chdir(project)
    monkeypatch.setattr(sys, "argv", ["demo_data", "--out", "../victim"])  # demo_data replaces its output folder
    with pytest.raises(ValueError, match="refusing to write '../victim'"):
        stages.demo_data.main()
    assert (tmp_path / "victim" / "keep.txt").read_text() == "mine"


def test_the_code_digest_follows_the_loaded_source_files(tmp_path, monkeypatch):
    """What makes `dvc repro` rebuild a persisted store after a code change instead of resuming it."""
    import sys
    import types

    from stages import loaded_code_sha256

    source = tmp_path / "pipeline_probe.py"
    source.write_text("VALUE = 1\n")
    module = types.ModuleType("pipeline.probe_for_digest")
    module.__file__ = str(source)
    monkeypatch.setitem(sys.modules, "pipeline.probe_for_digest", module)
    before = loaded_code_sha256()
    assert loaded_code_sha256() == before
    source.write_text("VALUE = 2\n")
    assert loaded_code_sha256() != before
