import json

import numpy as np
import pytest

from conftest import write_synthetic_store
from pipeline.evaluation.predictions import create_predictions
from pipeline.evaluation.scoring import score_predictions, store_labels

CLASSES = ["background", "round", "square"]


def one_hot(labels: np.ndarray) -> np.ndarray:
    return (np.arange(len(CLASSES))[:, None, None] == labels).astype(np.float32)  # (K, S, S)


def write_predictions(path, predicted: dict[str, np.ndarray], uncertainty: bool = True):
    writer = create_predictions(path, list(predicted), CLASSES, 255, 2, has_uncertainty=uncertainty)
    for position, labels in enumerate(predicted.values()):
        writer.write(position, one_hot(labels), labels, np.full((2, 2), position, np.float32) if uncertainty else None)
    return path


def test_scores_sum_over_images_and_skip_unlabeled_ones(tmp_path):
    predicted = {"a": np.array([[0, 1], [2, 2]]), "b": np.array([[0, 0], [1, 1]]), "unlabeled": np.zeros((2, 2), int)}
    truth = {"a": np.array([[0, 1], [2, 0]]), "b": np.array([[0, 0], [1, 255]]), "unlabeled": None}
    metrics = score_predictions(write_predictions(tmp_path / "p.zarr", predicted), truth.get, "ignore_excluded",
                                tmp_path / "out" / "metrics.json", show_progress=False)
    # background ∩3 ∪4, round ∩2 ∪2 (the ignored pixel counts nowhere), square ∩1 ∪2
    assert metrics["per_class_iou"] == {"background": 0.75, "round": 1.0, "square": 0.5}
    assert metrics["miou"] == metrics["miou_ignore_excluded"] == pytest.approx(0.75)
    # The paper's definition: the ignored pixel predicted round enlarges round's union.
    assert metrics["miou_paper"] == pytest.approx(round((0.75 + 2 / 3 + 0.5) / 3, 6))
    assert metrics["pixel_accuracy"] == pytest.approx(6 / 7)
    assert metrics["mean_uncertainty"] == pytest.approx(1.0) and metrics["images"] == 3
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == metrics


def test_predictions_without_uncertainty_have_none(tmp_path):
    path = write_predictions(tmp_path / "p.zarr", {"a": np.zeros((2, 2), int)}, uncertainty=False)
    metrics = score_predictions(path, lambda name: np.zeros((2, 2), int), show_progress=False)
    assert metrics["mean_uncertainty"] is None and metrics["per_class_iou"]["background"] == 1.0


def test_a_store_gives_the_labels_by_name(tmp_path):
    truth = [np.eye(2, dtype=np.int64), None]
    write_synthetic_store(tmp_path / "store.zarr", "native", truth, size=2)
    labels = store_labels(tmp_path / "store.zarr")
    np.testing.assert_array_equal(labels("image_00"), truth[0])
    assert labels("image_01") is None
    with pytest.raises(KeyError, match="image_02"):
        labels("image_02")
    # Predicted in another order than the store's: matched by name.
    path = write_predictions(tmp_path / "p.zarr", {"image_01": np.zeros((2, 2), int), "image_00": np.eye(2, dtype=int)})
    metrics = score_predictions(path, tmp_path / "store.zarr", show_progress=False)
    assert metrics["pixel_accuracy"] == 1.0 and metrics["images"] == 2
