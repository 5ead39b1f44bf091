"""Tests of the cartoon-face demo dataset (pipeline/data/demo.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from pipeline.config import DemoSpec
from pipeline.data.demo import (
    BACKGROUND,
    BROW,
    CLASS_NAMES,
    EAR,
    EYE,
    MOUTH,
    NOSE,
    SKIN,
    make_face,
    stream_rng,
    write_demo_dataset,
)

SMALL_SPEC = DemoSpec(size=32, pool_images=6, train_images=4, test_images=5, seed=3)
PARTS = range(1, len(CLASS_NAMES))


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("demo") / "faces"
    write_demo_dataset(SMALL_SPEC, out_dir)
    return out_dir


@pytest.fixture(scope="module")
def faces() -> list[tuple[np.ndarray, np.ndarray]]:
    return [make_face(stream_rng(0, "train", index), 32) for index in range(150)]


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _interior(labels: np.ndarray, label: int) -> np.ndarray:
    """bool (H, W): pixels of `label` whose 4 neighbours have it too (no anti-aliased edge)."""
    mask = labels == label
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    inner[[0, -1], :] = inner[:, [0, -1]] = False
    return inner


@pytest.mark.parametrize("size", [32, 64])
def test_face_shapes_dtypes_and_label_range(size):
    for index in range(6):
        image, labels = make_face(stream_rng(0, "train", index), size)
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        assert labels.shape == (size, size) and labels.dtype == np.uint8
        assert labels.max() < len(CLASS_NAMES)
        assert (labels == BACKGROUND).any() and (labels == SKIN).any()


def test_same_seed_gives_identical_faces_and_other_seeds_differ():
    first = [make_face(stream_rng(5, "train", index), 32) for index in range(3)]
    again = [make_face(stream_rng(5, "train", index), 32) for index in range(3)]
    other = [make_face(stream_rng(6, "train", index), 32) for index in range(3)]
    for (image, labels), (image_again, labels_again) in zip(first, again):
        assert image.tobytes() == image_again.tobytes() and labels.tobytes() == labels_again.tobytes()
    assert all(a.tobytes() != b.tobytes() for (a, _), (b, _) in zip(first, other))


def test_written_dataset_is_deterministic(tmp_path, written):
    write_demo_dataset(SMALL_SPEC, tmp_path / "again")
    assert _tree_digest(tmp_path / "again") == _tree_digest(written)
    write_demo_dataset(DemoSpec(size=32, pool_images=6, train_images=4, test_images=5, seed=4), tmp_path / "other")
    assert _tree_digest(tmp_path / "other") != _tree_digest(written)


def test_labeled_faces_do_not_depend_on_pool_size(tmp_path, written):
    write_demo_dataset(DemoSpec(size=32, pool_images=9, train_images=4, test_images=5, seed=3), tmp_path / "bigger")
    assert _tree_digest(tmp_path / "bigger" / "real") == _tree_digest(written / "real")


def test_every_part_is_in_almost_every_test_face():
    present = np.zeros(len(CLASS_NAMES))
    count = DemoSpec().test_images
    for index in range(count):
        _, labels = make_face(stream_rng(0, "test", index), 32)
        present[np.unique(labels)] += 1
    assert (present / count >= 0.9).all(), dict(zip(CLASS_NAMES, present))


def test_labels_match_the_drawn_colours(faces):
    """Inside a part every pixel has the part's one colour (up to the noise), parts differ from
    the skin around them, ears have the skin's colour and the nose is the skin shifted."""
    noise = 3.0 / 255.0
    checked = 0
    for image, labels in faces:
        colours = {}
        for part in PARTS:
            inner = _interior(labels, part)
            if inner.sum() < 2:
                continue
            pixels = image[inner].astype(float) / 255.0  # (n, 3)
            assert pixels.std(axis=0).max() < 4 * noise, CLASS_NAMES[part]
            colours[part] = pixels.mean(axis=0)
        if SKIN in colours and EAR in colours:
            assert np.abs(colours[EAR] - colours[SKIN]).max() < 4 * noise
        if SKIN in colours and NOSE in colours:
            shift = colours[NOSE] - colours[SKIN]  # lighter or darker on every channel (some clipped)
            assert np.abs(shift).max() > 0.1 and (np.all(shift > -2 * noise) or np.all(shift < 2 * noise))
        for part in (EYE, BROW, MOUTH):
            if SKIN in colours and part in colours:
                assert np.linalg.norm(colours[part] - colours[SKIN]) > 0.3, CLASS_NAMES[part]
                checked += 1
    assert checked > 60  # thin parts (brows, mouths) often have no interior pixel at 32²


def test_parts_sit_where_a_face_has_them(faces):
    """Brows above eyes above the nose above the mouth, in every face (tilts stay under 15°)."""
    for image, labels in faces:
        rows = {part: np.nonzero(labels == part)[0].mean() for part in (BROW, EYE, NOSE, MOUTH) if (labels == part).any()}
        order = [rows[part] for part in (BROW, EYE, NOSE, MOUTH) if part in rows]
        assert order == sorted(order)


def test_colour_does_not_predict_the_part(faces):
    """A classifier on each part's mean colour stays near chance (7 parts, about equally common)."""
    colours, classes = [], []
    for image, labels in faces:
        for part in PARTS:
            if (labels == part).any():
                colours.append(image[labels == part].mean(axis=0) / 255.0)
                classes.append(part)
    colours, classes = np.array(colours), np.array(classes)
    accuracy = cross_val_score(LogisticRegression(max_iter=1000), colours, classes, cv=4).mean()
    majority = np.bincount(classes).max() / len(classes)
    assert majority < 0.16 and accuracy < majority + 0.08


def test_faces_vary_in_place_size_and_colour(faces):
    centres = np.array([np.argwhere(labels == SKIN).mean(axis=0) for _, labels in faces])  # (n, 2)
    areas = np.array([(labels != BACKGROUND).sum() for _, labels in faces])
    mean_colours = np.stack([image.reshape(-1, 3).mean(axis=0) for image, _ in faces])
    assert centres.std(axis=0).min() > 1.0
    assert areas.max() > 1.5 * areas.min()
    assert mean_colours.std(axis=0).min() > 20.0


def test_disk_layout_and_classes_json(written):
    train = sorted((written / "real" / "train").iterdir())
    test = sorted((written / "real" / "test").iterdir())
    pool = sorted((written / "pool").iterdir())
    assert [path.name for path in train[:2]] == ["face_0000.npy", "face_0000.png"]
    assert len(train) == 2 * SMALL_SPEC.train_images and len(test) == 2 * SMALL_SPEC.test_images
    assert len(pool) == SMALL_SPEC.pool_images and all(path.suffix == ".png" for path in pool)
    for png in (written / "real" / "train").glob("*.png"):
        labels = np.load(png.with_suffix(".npy"))
        image = np.asarray(Image.open(png))
        assert labels.dtype == np.uint8 and labels.shape == image.shape[:2] == (32, 32)
    classes = json.loads((written / "classes.json").read_text())
    assert classes == {
        "num_classes": 8,
        "ignore_label": 255,
        "train": SMALL_SPEC.train_images,
        "test": SMALL_SPEC.test_images,
        "names": list(CLASS_NAMES),
    }


def test_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "stale.png").write_bytes(b"")
    with pytest.raises(FileExistsError, match="not empty"):
        write_demo_dataset(SMALL_SPEC, tmp_path)


@pytest.mark.parametrize("settings, message", [(dict(size=8), "at least 16"), (dict(train_images=-1), "train_images")])
def test_spec_rejects_bad_values(settings, message):
    with pytest.raises(ValueError, match=message):
        DemoSpec(**settings)


def test_faces_without_parts_are_the_same_faces_with_those_parts_left_out(tmp_path):
    from pipeline.data.demo import EAR, MOUTH, SKIN, make_face, stream_rng, write_faces

    _, labels = make_face(stream_rng(0, "train", 3), 32)
    _, omitted = make_face(stream_rng(0, "train", 3), 32, omit=(EAR, MOUTH))
    assert (labels == EAR).any() and (labels == MOUTH).any()
    assert not np.isin(omitted, [EAR, MOUTH]).any()
    unchanged = ~np.isin(labels, [EAR, MOUTH])
    np.testing.assert_array_equal(omitted[unchanged], labels[unchanged])
    assert (omitted[labels == MOUTH] == SKIN).all()  # the mouth sits on the skin
    write_faces(tmp_path / "faces", 3, 32, seed=0, omit=(EAR,))
    classes = json.loads((tmp_path / "faces" / "classes.json").read_text())
    assert classes["omitted"] == ["ear"] and len(classes["names"]) == 8
    stored = np.load(tmp_path / "faces" / "face_0002.npy")
    assert stored.shape == (32, 32) and not (stored == EAR).any()
    with pytest.raises(FileExistsError):
        write_faces(tmp_path / "faces", 3, 32, seed=0)


def test_stickers_add_many_part_like_classes_and_leave_the_face_as_it_was(tmp_path):
    from pipeline.data.demo import CLASS_NAMES, make_face, stream_rng, write_faces

    _, plain = make_face(stream_rng(0, "train", 5), 32)
    _, labels = make_face(stream_rng(0, "train", 5), 32, sticker_classes=24)
    stickers = labels >= len(CLASS_NAMES)
    assert stickers.any() and labels.max() < len(CLASS_NAMES) + 24 and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels[~stickers], plain[~stickers])  # drawn over the face, nothing else moves
    assert 6 <= stickers.sum() <= 3 * 45  # 1 to 3 stickers of radius 2 to 3.5 pixels
    with pytest.raises(ValueError, match="sticker_classes must be in"):
        make_face(stream_rng(0, "train", 5), 32, sticker_classes=300)
    _, large = make_face(stream_rng(0, "train", 5), 32, sticker_classes=24, sticker_radius=(8.0, 9.0))
    assert (large >= len(CLASS_NAMES)).sum() > 3 * stickers.sum()  # radius 8 to 9 against 2 to 3.5
    with pytest.raises(ValueError, match="sticker_radius must be"):
        make_face(stream_rng(0, "train", 5), 32, sticker_classes=24, sticker_radius=(4.0, 2.0))
    write_faces(tmp_path / "faces", 2, 32, seed=0, sticker_classes=3)
    names = json.loads((tmp_path / "faces" / "classes.json").read_text())["names"]
    assert names[len(CLASS_NAMES):] == ["sticker_0", "sticker_1", "sticker_2"]
