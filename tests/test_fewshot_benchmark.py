"""The few-shot benchmark over fold models: every method on the same episodes, means over the
folds, the headline numbers, the chart, and the refusals; a model stored in float16 reloads."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import safetensors.torch
import torch

from conftest import PROJECT_ROOT, tiny_attention_unet, write_image_folder
from pipeline.config import FewShotSettings
from pipeline.data.demo import CLASS_NAMES
from pipeline.data.folders import ClassInfo
from pipeline.fewshot.benchmark import benchmark_fewshot, find_fold_models, summarise
from pipeline.fewshot.episodes import dataset_fold
from pipeline.fewshot.training import load_fewshot_model, train_fewshot

NAMES = ["background", "disc", "square"]
SETTINGS = FewShotSettings(shots=1, episodes=3, steps=2, batch_size=1, learning_rate=1e-3, image_size=16, seed=0,
                           device="cpu", threads=1, baseline_members=2, baseline_training_steps=5,
                           baseline_steps=[10])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A pixel UNet, a labeled folder, and fold models: disc novel (with a random-init twin), square novel."""
    root = tmp_path_factory.mktemp("benchmark")
    tiny_attention_unet().save_pretrained(root / "unet")
    write_image_folder(root / "images", count=6, size=32, seed=0)
    (root / "images" / "classes.json").write_text(json.dumps({"names": NAMES, "ignore_label": 255}))
    for fold, novel in ((0, "disc"), (1, "square")):
        settings = dataclasses.replace(SETTINGS, novel_classes=[novel])
        train_fewshot(root / "unet", root / "images", root / "models" / "pretrained" / f"fold-{fold}", settings,
                      show_progress=False)
    train_fewshot(root / "unet", root / "images", root / "models" / "random-init" / "fold-0",
                  dataclasses.replace(SETTINGS, novel_classes=["disc"], random_init=True), show_progress=False)
    return root


def test_every_method_meets_the_same_episodes_and_is_averaged_over_the_folds(models):
    root = models
    summary = benchmark_fewshot(root / "models", root / "unet", root / "images", root / "out", SETTINGS, shots=(1, 2),
                                show_progress=False)
    methods = summary["methods"]
    assert set(methods) == {"diffews_1shot", "diffews_2shot", "prototype_1shot", "ensemble_1shot", "random_init_1shot"}
    assert summary["folds"] == [0, 1] and summary["episodes_per_fold"] == 3
    for name in ("diffews_1shot", "prototype_1shot", "ensemble_1shot"):
        assert set(methods[name]["per_fold"]) == {"0", "1"}
        assert methods[name]["miou"] == pytest.approx(np.mean(list(methods[name]["per_fold"].values())), abs=1e-4)
        assert set(methods[name]["per_class_iou"]) == {"disc", "square"}
    assert set(methods["random_init_1shot"]["per_fold"]) == {"0"}  # fold 1 has no random-init model
    assert methods["random_init_1shot"]["miou"] == methods["random_init_1shot"]["per_fold"]["0"]
    headline = summary["metrics"]
    assert headline["fewshot_miou_1shot"] == methods["diffews_1shot"]["miou"]
    assert headline["fewshot_prototype_miou_1shot"] == methods["prototype_1shot"]["miou"]
    assert headline["fewshot_margin_over_prototype"] == pytest.approx(
        100 * (methods["diffews_1shot"]["miou"] - methods["prototype_1shot"]["miou"]), abs=0.01)
    # The same episodes: every 1-shot run of fold 0 scored the same number of episodes of each class.
    runs = [json.loads((root / "out" / "runs" / "fold-0" / name / "metrics.json").read_text())
            for name in ("diffews-1shot", "prototype-1shot", "ensemble-1shot", "random-init-1shot")]
    assert all(run["episodes_per_class"] == runs[0]["episodes_per_class"] == {"disc": 3} for run in runs)
    assert json.loads((root / "out" / "metrics.json").read_text()) == json.loads(json.dumps(summary))
    assert (root / "out" / "fewshot.png").stat().st_size > 10_000


def test_summaries_mean_the_folds_and_skip_missing_methods():
    def run(miou, classes):
        return {"miou": miou, "fb_iou": 0.5, "per_class_iou": classes, "seconds_per_episode": 0.1}

    summary = summarise({0: {"diffews_1shot": run(0.4, {"a": 0.4}), "prototype_1shot": run(0.2, {"a": 0.2})},
                         1: {"diffews_1shot": run(0.6, {"b": 0.6}), "prototype_1shot": run(0.3, {"b": 0.3})}})
    assert summary["metrics"] == {"fewshot_miou_1shot": 0.5, "fewshot_prototype_miou_1shot": 0.25,
                                  "fewshot_margin_over_prototype": 25.0}
    assert summary["methods"]["diffews_1shot"]["classes_per_fold"] == {"0": ["a"], "1": ["b"]}


def test_a_models_folder_without_fold_models_or_with_mismatched_ones_is_refused(models, tmp_path):
    root = models
    with pytest.raises(ValueError, match="holds no few-shot model as pretrained/fold-F"):
        find_fold_models(tmp_path)
    shutil.copytree(root / "models" / "random-init" / "fold-0", tmp_path / "random-init" / "fold-3")
    shutil.copytree(root / "models" / "pretrained" / "fold-1", tmp_path / "pretrained" / "fold-1")
    with pytest.raises(ValueError, match=r"has folds \[3\] that pretrained/ lacks"):
        find_fold_models(tmp_path)
    shutil.move(tmp_path / "random-init" / "fold-3", tmp_path / "random-init" / "fold-1")  # disc novel, fold 1: square
    with pytest.raises(ValueError, match=r"trained for the novel classes \['disc'\]"):
        benchmark_fewshot(tmp_path, root / "unet", root / "images", tmp_path / "out", SETTINGS, show_progress=False)
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_a_model_stored_in_float16_reloads_as_float32(models, tmp_path):
    source = models / "models" / "pretrained" / "fold-0"
    shutil.copytree(source, tmp_path / "model")
    weights = safetensors.torch.load_file(source / "model.safetensors")
    safetensors.torch.save_file({name: tensor.half() for name, tensor in weights.items()},
                                tmp_path / "model" / "model.safetensors")
    loaded = load_fewshot_model(tmp_path / "model").model
    original = load_fewshot_model(source).model
    assert all(parameter.dtype == torch.float32 for parameter in loaded.parameters())
    for (name, parameter), reference in zip(loaded.named_parameters(), original.parameters()):
        torch.testing.assert_close(parameter, reference, atol=2e-3, rtol=1e-3, msg=name)


def test_the_committed_demo_models_hold_one_fold_each_and_load():
    """data/checkpoints/demo_fewshot: the models `dvc repro` scores (stage fewshot), one per fold of
    the demo's 7 face parts, each trained without its fold's parts, with its random-init twin."""
    models_dir = PROJECT_ROOT / "data" / "checkpoints" / "demo_fewshot"
    folds = find_fold_models(models_dir)
    assert sorted(folds) == [0, 1, 2, 3] and all(set(models) == {"pretrained", "random-init"} for models in folds.values())
    classes = ClassInfo(list(CLASS_NAMES), 255)
    recipe = json.loads((models_dir / "recipe.json").read_text())
    for fold, models in folds.items():
        novel = [CLASS_NAMES[label] for label in dataset_fold(classes, 4, fold).test_classes]
        for kind, folder in models.items():
            record = json.loads((folder / "fewshot.json").read_text())
            assert record["fold"]["test_classes"] == novel
            assert not set(novel) & set(record["fold"]["train_classes"])  # never trained on its novel parts
            assert record["settings"]["random_init"] == (kind == "random-init")
            assert record["steps"] == recipe["runs"][f"{kind}/fold-{fold}"]["steps"]  # as the recipe records it
            assert record["steps"] == recipe["settings"]["steps"]  # baseline (c) trains as long as DiffewS
    loaded = load_fewshot_model(folds[2]["pretrained"])
    assert all(parameter.dtype == torch.float32 for parameter in loaded.model.parameters())
