import numpy as np
import pytest
from PIL import Image

from conftest import write_synthetic_store
from pipeline.evaluation.predictions import create_predictions
from pipeline.evaluation.report import write_masks_and_pictures, write_per_class_chart

CLASSES = ["background", "round", "square"]


def test_masks_and_the_grid_are_drawn_from_the_stored_labels(tmp_path):
    write_synthetic_store(tmp_path / "store.zarr", "native", [np.zeros((16, 16), np.int64), None, None], size=16)
    writer = create_predictions(tmp_path / "p.zarr", ["image_02", "image_00"], CLASSES, 255, 16, has_uncertainty=True)
    predicted = [np.full((16, 16), 2), np.eye(16, dtype=np.int64)]
    for position, labels in enumerate(predicted):
        # Probabilities that disagree with the labels: the labels are what is drawn.
        writer.write(position, np.full((3, 16, 16), 1 / 3, np.float32), labels, np.zeros((16, 16), np.float32))
    write_masks_and_pictures(tmp_path / "p.zarr", tmp_path / "store.zarr", tmp_path / "out", pictures=1, show_progress=False)
    for name, labels in zip(["image_02", "image_00"], predicted):
        mask = np.load(tmp_path / "out" / "masks" / f"{name}.npy")
        assert mask.dtype == np.int16
        np.testing.assert_array_equal(mask, labels)
        assert Image.open(tmp_path / "out" / "masks" / f"{name}.png").size == (16, 16)
    assert not (tmp_path / "out" / "masks" / "image_01.npy").exists()  # not predicted
    assert Image.open(tmp_path / "out" / "predictions.png").size[0] > 200


def test_predictions_of_images_not_in_the_store_are_refused(tmp_path):
    write_synthetic_store(tmp_path / "store.zarr", "native", [None], size=16)
    writer = create_predictions(tmp_path / "p.zarr", ["elsewhere"], CLASSES, 255, 16, has_uncertainty=False)
    writer.write(0, np.full((3, 16, 16), 1 / 3, np.float32))
    with pytest.raises(ValueError, match="elsewhere"):
        write_masks_and_pictures(tmp_path / "p.zarr", tmp_path / "store.zarr", tmp_path / "out", show_progress=False)


def test_the_per_class_chart(tmp_path):
    write_per_class_chart({"miou": 0.5, "per_class_iou": {"round": 0.25, "square": 0.75}}, tmp_path)
    assert Image.open(tmp_path / "per_class_iou.png").size[0] > 100
