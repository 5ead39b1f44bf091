import json

import numpy as np
import pytest
from PIL import Image

from conftest import write_learnable_store
from pipeline.config import EvaluateSettings, TrainSettings
from pipeline.evaluation.evaluate import evaluate_on_store
from pipeline.heads.pixel_ensemble.training import train_on_store
from pipeline.store.schema import StoreMismatchError


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluation")
    write_learnable_store(root / "train.zarr", seed=0)
    write_learnable_store(root / "test.zarr", count=3, seed=1)
    settings = TrainSettings(members=3, max_epochs=8, buffer_pixels=300, device="cpu")
    train_on_store(root / "train.zarr", root / "ensemble", settings, show_progress=False)
    return root


def test_evaluation_scores_masks_and_pictures(trained, tmp_path):
    metrics = evaluate_on_store(
        trained / "ensemble", trained / "test.zarr", tmp_path, EvaluateSettings(pictures=2), show_progress=False
    )
    assert metrics["miou"] > 0.9 and metrics["pixel_accuracy"] > 0.95 and metrics["images"] == 3
    # The headline is the official IoU; both definitions are reported (equal here: no ignored pixels).
    assert metrics["iou_definition"] == "paper" and metrics["miou"] == metrics["miou_paper"]
    assert metrics["miou_ignore_excluded"] == pytest.approx(metrics["miou_paper"])
    assert set(metrics["per_class_iou"]) == {"background", "round", "square"}
    assert metrics["mean_uncertainty"] >= 0
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    for name in ("image_00", "image_01", "image_02"):
        mask = np.load(tmp_path / "masks" / f"{name}.npy")
        assert mask.shape == (16, 16) and set(np.unique(mask)) <= {0, 1, 2}
        assert Image.open(tmp_path / "masks" / f"{name}.png").size == (16, 16)
    assert Image.open(tmp_path / "predictions.png").size[0] > 200
    assert (tmp_path / "per_class_iou.png").is_file()


def test_band_size_does_not_change_the_prediction(trained, tmp_path):
    evaluate_on_store(trained / "ensemble", trained / "test.zarr", tmp_path / "a", EvaluateSettings(pixels_per_batch=16), show_progress=False)
    evaluate_on_store(trained / "ensemble", trained / "test.zarr", tmp_path / "b", EvaluateSettings(pixels_per_batch=100000), show_progress=False)
    np.testing.assert_array_equal(np.load(tmp_path / "a" / "masks" / "image_01.npy"), np.load(tmp_path / "b" / "masks" / "image_01.npy"))


def test_an_ensemble_of_other_features_is_refused(trained, tmp_path):
    config_path = trained / "ensemble" / "ensemble.json"
    original = config_path.read_text()
    config = json.loads(original)
    config["features"]["checkpoint_sha256"] = "f" * 64
    config_path.write_text(json.dumps(config))
    try:
        with pytest.raises(StoreMismatchError, match="checkpoint_sha256"):
            evaluate_on_store(trained / "ensemble", trained / "test.zarr", tmp_path, EvaluateSettings(), show_progress=False)
    finally:
        config_path.write_text(original)
