"""The distilled segmenter: architectures, training (best epoch, resume), saving, ONNX, predictions."""

import json

import numpy as np
import onnxruntime
import pytest
import torch

from conftest import write_image_folder
from pipeline.config import SegmenterSettings
from pipeline.heads.segmenter.architectures import build_network
from pipeline.heads.segmenter.segmenter import load_segmenter
from pipeline.heads.segmenter.training import train_segmenter

CLASSES = {"names": ["background", "disc", "square"], "ignore_label": 255}
SETTINGS = SegmenterSettings(epochs=3, batch_size=4, seed=0, device="cpu", threads=1)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("segmenter")
    write_image_folder(root / "train", count=12, size=16, seed=0)
    write_image_folder(root / "real", count=3, size=16, seed=1)
    for name in ("train", "real"):
        (root / name / "classes.json").write_text(json.dumps(CLASSES))
    return root


@pytest.fixture(scope="module")
def trained(folders):
    summary = train_segmenter(folders / "train", folders / "model", SETTINGS, folders / "real", show_progress=False)
    return summary


def test_training_keeps_the_best_validated_epoch(folders, trained):
    log = json.loads((folders / "model" / "training.json").read_text())
    scores = [epoch["validation_miou"] for epoch in log["epochs"]]
    assert len(scores) == 3 and trained.chosen_epoch == int(np.argmax(scores))
    assert log["chosen_epoch"] == trained.chosen_epoch and trained.validation_miou == max(scores)
    assert all(epoch["loss"] > 0 for epoch in log["epochs"])
    assert set(log["epochs"][0]["validation_per_class_iou"]) == set(CLASSES["names"])
    assert (folders / "model" / "training.png").stat().st_size > 1000
    segmenter = load_segmenter(folders / "model")
    assert segmenter.class_names == CLASSES["names"] and segmenter.image_size == 16
    assert segmenter.record["chosen_epoch"] == trained.chosen_epoch


def test_training_learns_the_shapes(folders, tmp_path):
    settings = SegmenterSettings(epochs=15, batch_size=4, seed=0, device="cpu", threads=1, learning_rate=0.01)
    summary = train_segmenter(folders / "train", tmp_path / "model", settings, folders / "real", show_progress=False)
    assert summary.validation_miou > 0.6  # 3 classes: chance is about 0.2


def test_a_stopped_run_resumes_to_the_same_segmenter(folders, trained, tmp_path, monkeypatch):
    from pipeline.heads.segmenter import training

    calls = {"count": 0}
    original = training._save_progress

    def stop_after_two(*arguments):
        original(*arguments)
        calls["count"] += 1
        if calls["count"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "_save_progress", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        train_segmenter(folders / "train", tmp_path / "model", SETTINGS, folders / "real", show_progress=False)
    assert not (tmp_path / "model" / "segmenter.json").exists()  # nothing half-written where a reader looks
    monkeypatch.setattr(training, "_save_progress", original)
    resumed = train_segmenter(folders / "train", tmp_path / "model", SETTINGS, folders / "real", show_progress=False)
    assert resumed.chosen_epoch == trained.chosen_epoch
    first, second = (load_segmenter(path).network.state_dict() for path in (folders / "model", tmp_path / "model"))
    for name in first:
        torch.testing.assert_close(first[name], second[name])
    with pytest.raises(FileExistsError, match="other settings"):
        train_segmenter(folders / "train", tmp_path / "model", SegmenterSettings(epochs=4, batch_size=4, device="cpu"),
                        folders / "real", show_progress=False)


def test_onnx_export_gives_the_same_logits(folders, trained):
    segmenter = load_segmenter(folders / "model")
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.inference_mode():
        expected = segmenter.network(images).numpy()
    session = onnxruntime.InferenceSession(str(folders / "model" / "model.onnx"))
    (logits,) = session.run(None, {"image": images.numpy()})
    assert logits.shape == (2, 3, 16, 16)
    np.testing.assert_allclose(logits, expected, atol=1e-4)


def test_probabilities_at_another_size_come_back_at_that_size(folders, trained):
    segmenter = load_segmenter(folders / "model")
    probabilities = segmenter.probabilities(torch.zeros(1, 3, 24, 40))
    assert probabilities.shape == (1, 3, 24, 40)
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(1, 24, 40))


def test_the_input_map_is_the_identity_for_unets_and_imagenet_for_an_imagenet_backbone():
    network = build_network("basic-unet", 4).eval()
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(images * network.scale + network.shift, images)
    assert network(images).shape == (1, 4, 32, 32)


def test_deeplab_without_torchvision_is_refused_clearly():
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError):
        with pytest.raises(ValueError, match="needs torchvision"):
            build_network("deeplabv3-resnet101", 4)
    else:
        pytest.skip("torchvision is installed here: the refusal is for machines without it")


def test_bad_folders_are_refused_before_anything_is_written(folders, tmp_path):
    write_image_folder(tmp_path / "unlabeled", count=10, size=16, labeled=False)
    (tmp_path / "unlabeled" / "classes.json").write_text(json.dumps(CLASSES))
    with pytest.raises(ValueError, match="have no label map"):
        train_segmenter(tmp_path / "unlabeled", tmp_path / "out", SETTINGS, show_progress=False)
    write_image_folder(tmp_path / "no-classes", count=10, size=16)
    with pytest.raises(ValueError, match="no classes.json"):
        train_segmenter(tmp_path / "no-classes", tmp_path / "out", SETTINGS, show_progress=False)
    with pytest.raises(ValueError, match="fewer than one batch"):
        train_segmenter(folders / "real", tmp_path / "out", SETTINGS, show_progress=False)
    other = tmp_path / "other"
    write_image_folder(other, count=2, size=16)
    (other / "classes.json").write_text(json.dumps({"names": ["a", "b", "c"], "ignore_label": 255}))
    with pytest.raises(ValueError, match="has the classes"):
        train_segmenter(folders / "train", tmp_path / "out", SETTINGS, other, show_progress=False)
    assert not (tmp_path / "out").exists()


def test_flips_mirror_images_and_labels_together():
    from pipeline.heads.segmenter.training import _flip_half

    images = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).reshape(2, 3, 2, 4)
    labels = images[:, 0].long()
    flipped, flipped_labels = _flip_half(images, labels, torch.Generator().manual_seed(0))
    for index in range(2):
        mirrored = torch.equal(flipped[index], images[index].flip(-1))
        assert mirrored or torch.equal(flipped[index], images[index])
        assert torch.equal(flipped_labels[index], flipped[index, 0].long())


def test_the_committed_demo_segmenter_is_the_recipe_params_yaml_gives():
    """`dvc repro` evaluates data/checkpoints/demo_segmenter without remaking it: params.yaml's
    synthesize and segmenter sections must be the recipe it was made with."""
    from conftest import PROJECT_ROOT
    from pipeline.config import load_params
    from pipeline.data.demo import CLASS_NAMES

    folder = PROJECT_ROOT / "data" / "checkpoints" / "demo_segmenter"
    recipe = json.loads((folder / "recipe.json").read_text())
    params = load_params(PROJECT_ROOT / "params.yaml")
    for section in ("synthesize", "segmenter"):
        wanted = {key: value for key, value in getattr(params, section).__dict__.items()
                  if key not in ("device", "threads", "pictures")}
        assert {key: recipe[section][key] for key in wanted} == wanted, section
    segmenter = load_segmenter(folder)
    assert segmenter.class_names == list(CLASS_NAMES) and segmenter.image_size == 32
    assert segmenter.record["chosen_epoch"] == recipe["chosen_epoch"]
    assert recipe["kept"] == round(recipe["synthesize"]["count"] * (1 - recipe["synthesize"]["filter_fraction"]))
