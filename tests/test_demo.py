"""Tests of the digit-scene demo dataset (pipeline/demo.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from pipeline.demo import (
    CLASS_NAMES,
    DemoSpec,
    load_digit_halves,
    make_scene,
    write_demo_dataset,
)

SMALL_SPEC = DemoSpec(size=32, pool_images=6, train_images=4, test_images=5, seed=3)


@pytest.fixture(scope="module")
def halves() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return load_digit_halves(seed=0)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("demo") / "digits"
    write_demo_dataset(SMALL_SPEC, out_dir)
    return out_dir


def _scenes(halves, half: str, count: int, size: int = 32, seed: int = 0):
    digits, targets = halves[half]
    return [
        make_scene(np.random.default_rng([seed, index]), digits, targets, size, 2, 4)
        for index in range(count)
    ]


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def test_digit_halves_are_disjoint_and_cover_all_digits(halves):
    train_digits, train_targets = halves["train"]
    test_digits, test_targets = halves["test"]
    assert len(train_targets) + len(test_targets) == 1797
    assert train_digits.dtype == np.float32 and train_digits.shape[1:] == (8, 8)
    assert 0.0 <= train_digits.min() and train_digits.max() <= 1.0
    train_rows = {digit.tobytes() for digit in train_digits}
    test_rows = {digit.tobytes() for digit in test_digits}
    # A handful of identical bitmaps exist in load_digits; the halves are still nearly disjoint.
    assert len(train_rows & test_rows) <= 5
    assert set(train_targets) == set(test_targets) == set(range(10))


@pytest.mark.parametrize("size", [32, 64])
def test_scene_shapes_dtypes_and_label_range(halves, size):
    for image, labels in _scenes(halves, "train", 6, size=size):
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        assert labels.shape == (size, size) and labels.dtype == np.uint8
        assert labels.max() <= 10
        assert (labels == 0).any() and (labels > 0).any()


def test_same_seed_gives_identical_scenes_and_other_seeds_differ(halves):
    first = _scenes(halves, "train", 3, seed=5)
    second = _scenes(halves, "train", 3, seed=5)
    other = _scenes(halves, "train", 3, seed=6)
    for (image, labels), (image_again, labels_again) in zip(first, second):
        assert image.tobytes() == image_again.tobytes()
        assert labels.tobytes() == labels_again.tobytes()
    assert all(a.tobytes() != b.tobytes() for (a, _), (b, _) in zip(first, other))


def test_written_dataset_is_deterministic(tmp_path, written):
    write_demo_dataset(SMALL_SPEC, tmp_path / "again")
    assert _tree_digest(tmp_path / "again") == _tree_digest(written)
    other_seed = DemoSpec(size=32, pool_images=6, train_images=4, test_images=5, seed=4)
    write_demo_dataset(other_seed, tmp_path / "other")
    assert _tree_digest(tmp_path / "other") != _tree_digest(written)


def test_labeled_scenes_do_not_depend_on_pool_size(tmp_path, written):
    bigger_pool = DemoSpec(size=32, pool_images=9, train_images=4, test_images=5, seed=3)
    write_demo_dataset(bigger_pool, tmp_path / "bigger")
    assert _tree_digest(tmp_path / "bigger" / "real") == _tree_digest(written / "real")


def test_every_class_appears_in_the_default_size_test_split(halves):
    seen = np.zeros(11, dtype=bool)
    for _, labels in _scenes(halves, "test", DemoSpec().test_images):
        seen[np.unique(labels)] = True
    assert seen.all()


def test_labels_agree_with_pixels(halves):
    """Labeled pixels differ clearly from the bare background; label-0 pixels mostly do not."""
    digits, targets = halves["train"]
    blank = np.zeros_like(digits)
    labeled_distances, background_distances = [], []
    for index in range(20):
        # The same generator state draws the same background, noise and colours for both.
        image, labels = make_scene(np.random.default_rng(index), digits, targets, 32, 2, 4)
        bare, bare_labels = make_scene(np.random.default_rng(index), blank, targets, 32, 2, 4)
        assert not bare_labels.any()
        distance = np.linalg.norm(image.astype(float) - bare.astype(float), axis=-1) / 255.0
        labeled_distances.append(distance[labels > 0])
        background_distances.append(distance[labels == 0])
    labeled_distances = np.concatenate(labeled_distances)
    background_distances = np.concatenate(background_distances)
    assert np.mean(labeled_distances > 0.15) > 0.9
    assert np.median(background_distances) < 0.03
    assert np.mean(background_distances > 0.25) < 0.05


def test_colour_does_not_predict_the_class(halves):
    """A classifier on each digit's mean colour stays near chance (10 classes)."""
    colours, classes = [], []
    for image, labels in _scenes(halves, "train", 150):
        for value in np.unique(labels[labels > 0]):
            colours.append(image[labels == value].mean(axis=0) / 255.0)
            classes.append(value)
    colours, classes = np.array(colours), np.array(classes)
    accuracy = cross_val_score(LogisticRegression(max_iter=500), colours, classes, cv=4).mean()
    majority = np.bincount(classes).max() / len(classes)
    assert accuracy < max(majority, 0.1) + 0.08


def test_scene_colours_vary(halves):
    images = np.stack([image for image, _ in _scenes(halves, "train", 40)])
    mean_colours = images.reshape(len(images), -1, 3).mean(axis=1)  # (40, 3)
    assert mean_colours.std(axis=0).min() > 20.0


def test_disk_layout_and_classes_json(written):
    train = sorted((written / "real" / "train").iterdir())
    test = sorted((written / "real" / "test").iterdir())
    pool = sorted((written / "pool").iterdir())
    assert [path.name for path in train[:2]] == ["scene_0000.npy", "scene_0000.png"]
    assert len(train) == 2 * SMALL_SPEC.train_images and len(test) == 2 * SMALL_SPEC.test_images
    assert len(pool) == SMALL_SPEC.pool_images and all(path.suffix == ".png" for path in pool)
    for png in (written / "real" / "train").glob("*.png"):
        labels = np.load(png.with_suffix(".npy"))
        image = np.asarray(Image.open(png))
        assert labels.dtype == np.uint8 and labels.shape == image.shape[:2]
        assert image.shape == (32, 32, 3)
    classes = json.loads((written / "classes.json").read_text())
    assert classes == {
        "num_classes": 11,
        "ignore_label": 255,
        "train": SMALL_SPEC.train_images,
        "test": SMALL_SPEC.test_images,
        "names": list(CLASS_NAMES),
    }
    assert CLASS_NAMES[0] == "background" and len(set(CLASS_NAMES)) == 11


def test_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "stale.png").write_bytes(b"")
    with pytest.raises(FileExistsError, match="not empty"):
        write_demo_dataset(SMALL_SPEC, tmp_path)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(size=8), "at least 16"),
        (dict(min_digits=3, max_digits=2), "min_digits"),
        (dict(train_images=-1), "train_images"),
    ],
)
def test_spec_rejects_bad_values(settings, message):
    with pytest.raises(ValueError, match=message):
        DemoSpec(**settings)


def test_make_scene_rejects_unnormalised_digits(halves):
    digits, targets = halves["train"]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        make_scene(np.random.default_rng(0), digits * 16.0, targets, 32, 2, 4)
