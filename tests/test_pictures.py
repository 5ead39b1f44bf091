"""Tests of the segmentation pictures (pipeline/pictures)."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
from PIL import Image

from pipeline.pictures.figures import (
    save_per_class_iou_chart,
    save_prediction_grid,
    save_training_curves,
    training_curve_rows,
)
from pipeline.pictures.masks import IGNORE_COLOUR, class_palette, colour_mask, overlay, save_png, uncertainty_image

NAMES = ["background", "zero", "one", "two", "three"]


def _labels(seed: int, size: int = 16, classes: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, size=(size, size)).astype(np.uint8)


def _grid_rows(count: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for index in range(count):
        truth = _labels(index)
        truth[0, :4] = 255
        rows.append(dict(
            image=rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8),
            ground_truth=truth,
            prediction=_labels(index + 10, classes=3),
            uncertainty=rng.uniform(0.0, 2.0, size=(16, 16)),
            title=f"scene {index}",
        ))
    return rows


@pytest.mark.parametrize("num_classes", [1, 2, 11, 21, 34, 55, 56, 256])
def test_palette_is_distinct_deterministic_and_not_white(num_classes):
    palette = class_palette(num_classes)
    assert palette.shape == (num_classes, 3) and palette.dtype == np.uint8
    assert len({tuple(colour) for colour in palette}) == num_classes
    assert not (palette == IGNORE_COLOUR).all(axis=1).any()
    assert np.array_equal(palette, class_palette(num_classes))
    assert palette[0].max() < 80  # dark background


def test_palette_first_colours_are_clearly_apart():
    palette = class_palette(21).astype(float)
    distances = np.linalg.norm(palette[:, None] - palette[None], axis=-1)
    np.fill_diagonal(distances, np.inf)
    assert distances.min() > 20.0
    assert np.array_equal(class_palette(256)[:21], class_palette(21))  # a prefix, not reshuffled


@pytest.mark.parametrize("num_classes", [0, 257])
def test_palette_rejects_bad_counts(num_classes):
    with pytest.raises(ValueError, match=str(num_classes)):
        class_palette(num_classes)


def test_colour_mask_paints_labels_and_ignore():
    palette = class_palette(5)
    labels = _labels(0).astype(np.int64)
    labels[:2] = 255
    coloured = colour_mask(labels, palette, ignore_label=255)
    assert coloured.shape == (16, 16, 3) and coloured.dtype == np.uint8
    assert (coloured[:2] == IGNORE_COLOUR).all()
    assert np.array_equal(coloured[2:], palette[labels[2:]])


def test_colour_mask_rejects_labels_outside_the_palette():
    labels = _labels(0)
    labels[3, 3] = 255
    with pytest.raises(ValueError, match="255"):
        colour_mask(labels, class_palette(5), ignore_label=None)
    with pytest.raises(ValueError, match=r"\[7\]"):
        colour_mask(np.full((2, 2), 7), class_palette(5))


def test_overlay_blends_classes_and_keeps_background_and_ignore():
    palette = class_palette(5)
    image = np.full((16, 16, 3), 100, dtype=np.uint8)
    labels = _labels(1)
    labels[0] = 255
    blended = overlay(image, labels, palette, alpha=0.5)
    assert blended.shape == image.shape and blended.dtype == np.uint8
    untouched = (labels == 0) | (labels == 255)
    assert np.array_equal(blended[untouched], image[untouched])
    expected = np.rint(0.5 * 100 + 0.5 * palette[labels[~untouched]].astype(float))
    assert np.array_equal(blended[~untouched], expected)
    assert np.array_equal(overlay(image, labels, palette, alpha=0.0), image)
    with pytest.raises(ValueError, match="alpha"):
        overlay(image, labels, palette, alpha=1.5)


def test_uncertainty_image_uses_magma_from_zero_to_max():
    values = np.linspace(0.0, 3.0, 12).reshape(3, 4)
    coloured = uncertainty_image(values)
    assert coloured.shape == (3, 4, 3) and coloured.dtype == np.uint8
    magma = matplotlib.colormaps["magma"]
    assert np.array_equal(coloured[0, 0], np.rint(np.array(magma(0.0)[:3]) * 255))
    assert np.array_equal(coloured[-1, -1], np.rint(np.array(magma(1.0)[:3]) * 255))
    nothing = uncertainty_image(np.zeros((2, 2)))  # no uncertainty: darkest colour, no NaN
    assert (nothing == coloured[0, 0]).all()
    assert np.array_equal(uncertainty_image(values, max_value=6.0)[-1, -1],
                          np.rint(np.array(magma(0.5)[:3]) * 255))
    with pytest.raises(ValueError, match="non-negative"):
        uncertainty_image(-values)


def test_save_png_round_trips(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    save_png(tmp_path / "nested" / "picture.png", array)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "nested" / "picture.png")), array)
    with pytest.raises(ValueError, match="uint8"):
        save_png(tmp_path / "bad.png", array.astype(np.float32))


def test_prediction_grid_is_written_with_one_row_per_image(tmp_path):
    path = tmp_path / "grid.png"
    save_prediction_grid(path, _grid_rows(3), NAMES, ignore_label=255)
    with Image.open(path) as picture:
        width, height = picture.size
        assert picture.format == "PNG"
    assert 700 <= width <= 1100 and 600 <= height <= 900  # 4 columns × 3 rows of 2 in at 100 dpi


def test_prediction_grid_leaves_out_missing_columns(tmp_path):
    rows = [dict(image=row["image"], prediction=row["prediction"]) for row in _grid_rows(2)]
    save_prediction_grid(tmp_path / "grid.png", rows, NAMES, ignore_label=None)
    with Image.open(tmp_path / "grid.png") as picture:
        assert picture.size[0] < 600  # two columns only


def test_prediction_grid_rejects_mismatched_shapes(tmp_path):
    rows = _grid_rows(2)
    rows[1]["prediction"] = np.zeros((8, 8), dtype=np.uint8)
    with pytest.raises(ValueError, match="row 1: 'prediction'"):
        save_prediction_grid(tmp_path / "grid.png", rows, NAMES)


def test_per_class_iou_chart_is_written(tmp_path):
    path = tmp_path / "iou.png"
    per_class_iou = {name: value for name, value in zip(NAMES, [0.9, 0.5, None, 0.0, 1.0])}
    save_per_class_iou_chart(path, per_class_iou, title="demo")
    with Image.open(path) as picture:
        width, height = picture.size
    assert width == 650 and 200 <= height <= 400
    with pytest.raises(ValueError, match="zero"):
        save_per_class_iou_chart(path, {"zero": 1.5}, title="bad")


@pytest.mark.parametrize("title", [
    "demo test mIoU by features and method (same labels)",  # data/miou_by_features.png's, cut off before
    "a much longer title than any chart has today, which has to wrap onto a second line to fit",
])
def test_a_long_title_beside_long_class_names_stays_inside_the_chart(tmp_path, title):
    path = tmp_path / "iou.png"
    save_per_class_iou_chart(path, {"DDPM features, selected taps, refined": 0.8, "raw pixels": 0.1}, title,
                             mean_line=False)
    with Image.open(path) as picture:
        pixels = np.asarray(picture.convert("L"))
    assert (pixels[:, -2:] > 250).all(), "something is drawn at the right edge: the title runs off the figure"


def test_training_curve_rows_have_one_column_per_member_and_stop_where_members_stopped():
    rows = training_curve_rows([[1.0, 0.5, 0.25], [2.0]])
    assert rows == [
        {"epoch": 0, "member_0": 1.0, "member_1": 2.0},
        {"epoch": 1, "member_0": 0.5},
        {"epoch": 2, "member_0": 0.25},
    ]
    assert training_curve_rows([]) == []


def test_training_curves_chart_is_written(tmp_path):
    path = tmp_path / "curves.png"
    save_training_curves(path, [[1.0, 0.5, 0.4], [1.1, 0.6]], title="demo")
    with Image.open(path) as picture:
        assert picture.size == (650, 400)
        pixels = np.asarray(picture.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10  # lines and text, not a blank page
    with pytest.raises(ValueError, match="no training losses"):
        save_training_curves(path, [[], []], title="empty")
