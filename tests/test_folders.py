import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import write_image_folder
from pipeline.data.folders import (
    ClassInfo,
    check_examples,
    find_class_info,
    first_images,
    list_images,
    load_example,
    load_image,
    load_label_map,
    require_label_maps,
    resize_nearest,
)


def test_images_are_sorted_and_paired_with_label_maps(tmp_path):
    folder = write_image_folder(tmp_path / "images", count=3)
    (folder / "img_001.npy").unlink()
    Image.new("RGB", (8, 8)).save(folder / "extra.jpg")
    (folder / "notes.txt").write_text("not an image")
    records = list_images(folder)
    assert [record.name for record in records] == ["extra", "img_000", "img_001", "img_002"]
    assert records[2].label_path is None and records[1].label_path == folder / "img_000.npy"


def test_image_loading_scales_to_minus_one_one_and_resizes(tmp_path):
    pixels = np.zeros((40, 40, 3), dtype=np.uint8)
    pixels[:, 20:] = 255
    Image.fromarray(pixels).save(tmp_path / "half.png")
    (record,) = list_images(tmp_path)
    image = load_image(record, 40)
    assert image.shape == (3, 40, 40) and image.dtype == np.float32
    assert image.min() == -1.0 and image.max() == 1.0
    assert load_image(record, 16).shape == (3, 16, 16)


def test_label_maps_resize_by_nearest_neighbour(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    np.save(tmp_path / "a.npy", np.array([[1, 2], [3, 4]], dtype=np.uint8))
    (record,) = list_images(tmp_path)
    labels = load_label_map(record, 4)
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]])


@pytest.mark.parametrize(("source", "size"), [(32, 32), (256, 256), (512, 256), (20, 32)])
def test_label_resizing_matches_torch_nearest_at_the_sizes_we_use(tmp_path, source, size):
    labels = np.random.default_rng(source * 1000 + size).integers(-1, 300, (source, source))  # int64, ignore -1
    np.save(tmp_path / "a.npy", labels)
    Image.new("RGB", (source, source)).save(tmp_path / "a.png")
    (record,) = list_images(tmp_path)
    resized = load_label_map(record, size)
    # interpolate has no int64 kernel: float64 holds these labels exactly.
    expected = F.interpolate(torch.from_numpy(labels).double()[None, None], size=(size, size), mode="nearest")
    np.testing.assert_array_equal(resized, expected[0, 0].long().numpy())


def test_errors_name_the_folder_or_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        list_images(tmp_path / "missing")
    with pytest.raises(ValueError, match="no PNG or JPEG"):
        list_images(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    np.save(tmp_path / "broken.npy", np.zeros((2, 2, 2)))
    (record,) = list_images(tmp_path)
    with pytest.raises(ValueError, match="broken.png"):
        load_image(record, 8)
    with pytest.raises(ValueError, match="broken.npy"):
        load_label_map(record, 8)


def test_duplicate_stems_are_refused(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "a.jpg")
    with pytest.raises(ValueError, match="share the name"):
        list_images(tmp_path)


def test_classes_json_is_found_beside_or_above_the_images(tmp_path):
    (tmp_path / "real" / "train").mkdir(parents=True)
    assert find_class_info(tmp_path / "real" / "train") is None
    (tmp_path / "classes.json").write_text(json.dumps({"names": ["bg", "cat"], "ignore_label": 255}))
    info = find_class_info(tmp_path / "real" / "train")
    assert info.names == ["bg", "cat"] and info.ignore_label == 255 and info.num_classes == 2


def test_examples_are_checked_before_extraction(tmp_path):
    from pipeline.data.folders import ClassInfo, check_examples, check_labels_complete, load_example

    classes = ClassInfo(names=["bg", "a", "b"], ignore_label=255)
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    np.save(tmp_path / "ok.npy", np.full((8, 8), 255, dtype=np.int32))  # ignore label anywhere is fine
    image, labels = load_example(list_images(tmp_path)[0], 4, classes)
    assert image.shape == (3, 4, 4) and labels.shape == (4, 4)
    check_examples(list_images(tmp_path), classes)

    np.save(tmp_path / "ok.npy", np.full((8, 8), 7, dtype=np.int64))
    with pytest.raises(ValueError, match=r"ok.npy holds \[7\]"):
        check_examples(list_images(tmp_path), classes)
    np.save(tmp_path / "ok.npy", np.zeros((8, 6), dtype=np.uint8))
    with pytest.raises(ValueError, match="8×6 but its image ok.png is 8×8"):
        check_examples(list_images(tmp_path), classes)
    np.save(tmp_path / "ok.npy", np.zeros((8, 8), dtype=np.uint8))
    Image.new("RGB", (10, 8)).save(tmp_path / "wide.png")
    with pytest.raises(ValueError, match="1 of 2 images have no label map.*wide.png"):
        check_labels_complete(list_images(tmp_path), tmp_path)
    check_examples(list_images(tmp_path), classes)  # a rectangle is an image like any other


# --- the paper's format and its variants -----------------------------------------------------


def _write_pair(folder, stem, image_size=(8, 8), labels=None, suffix=".png"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(stem))
    Image.fromarray(rng.integers(0, 255, (image_size[1], image_size[0], 3), dtype=np.uint8)).save(folder / f"{stem}{suffix}")
    if labels is not None:
        np.save(folder / f"{stem}.npy", labels)


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.int64])
def test_label_maps_of_any_integer_width_load_alike(tmp_path, dtype):
    labels = np.array([[0, 1, 2, 255]] * 4, dtype=dtype)
    _write_pair(tmp_path, "a", (4, 4), labels)
    (record,) = list_images(tmp_path)
    _, loaded = load_example(record, 4, ClassInfo(["a", "b", "c"], ignore_label=255))
    assert loaded.dtype == np.int64
    np.testing.assert_array_equal(loaded, labels.astype(np.int64))


def test_ignore_label_zero_is_accepted_and_255_present_with_ignore_255(tmp_path):
    _write_pair(tmp_path / "zero", "a", (4, 4), np.array([[0, 1, 2, 2]] * 4, dtype=np.int32))
    check_examples(list_images(tmp_path / "zero"), ClassInfo(["background", "b", "c"], ignore_label=0))
    _write_pair(tmp_path / "ff", "a", (4, 4), np.array([[255, 1, 2, 2]] * 4, dtype=np.int32))
    check_examples(list_images(tmp_path / "ff"), ClassInfo(["a", "b", "c"], ignore_label=255))
    with pytest.raises(ValueError, match=r"a\.npy holds \[255\]"):
        check_examples(list_images(tmp_path / "ff"), ClassInfo(["background", "b", "c"], ignore_label=0))


def test_jpeg_images_are_read(tmp_path):
    _write_pair(tmp_path, "photo", (16, 16), np.zeros((16, 16), np.uint8), suffix=".jpg")
    (record,) = list_images(tmp_path)
    image, labels = load_example(record, 8)
    assert record.image_path.suffix == ".jpg" and image.shape == (3, 8, 8) and labels.shape == (8, 8)


def test_a_rectangular_image_and_its_labels_are_resized_to_height_and_width(tmp_path):
    labels = np.arange(8 * 12, dtype=np.uint8).reshape(8, 12) % 5  # 12 wide, 8 high
    _write_pair(tmp_path, "wide", (12, 8), labels)
    (record,) = list_images(tmp_path)
    assert check_examples([record]) == [(8, 12)]
    image, same = load_example(record, (8, 12))
    assert image.shape == (3, 8, 12) and np.array_equal(same, labels)
    image, halved = load_example(record, (4, 6))  # nearest neighbour: every other row and column
    assert image.shape == (3, 4, 6) and np.array_equal(halved, labels[::2, ::2])
    image, square = load_example(record, 4)  # S still means S×S
    assert image.shape == (3, 4, 4) and np.array_equal(square, labels[::2, ::3])
    assert np.array_equal(resize_nearest(labels[::2, ::2], (8, 12)), np.repeat(np.repeat(labels[::2, ::2], 2, 0), 2, 1))


def test_a_labeled_split_names_every_image_without_a_label_map(tmp_path):
    for stem in ("a", "b", "c"):
        _write_pair(tmp_path, stem, (4, 4), np.zeros((4, 4), np.uint8) if stem == "b" else None)
    with pytest.raises(ValueError, match=r"2 of 3 images have no label map.*a\.png, c\.png"):
        require_label_maps(list_images(tmp_path), tmp_path)


def test_first_images_in_sorted_order_as_the_official_code(tmp_path):
    for stem in ("2", "10", "1"):
        _write_pair(tmp_path, stem, (4, 4), np.zeros((4, 4), np.uint8))
    records = list_images(tmp_path)
    assert [record.name for record in records] == ["1", "10", "2"]  # string order, like sorted(paths)
    assert [record.name for record in first_images(records, 2, tmp_path)] == ["1", "10"]
    assert len(first_images(records, 0, tmp_path)) == 3
    with pytest.raises(ValueError, match="holds 3 images but the protocol uses the first 5"):
        first_images(records, 5, tmp_path)


def test_images_are_resized_bilinearly_and_labels_by_nearest_neighbour(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    np.save(tmp_path / "a.npy", np.arange(400, dtype=np.int32).reshape(20, 20) % 7)
    (record,) = list_images(tmp_path)
    image, labels = load_example(record, 8)
    # torchvision's Resize on a PIL image (the official transform) is PIL's bilinear resize.
    expected = np.asarray(Image.fromarray(pixels).resize((8, 8), Image.Resampling.BILINEAR), np.float32) / 127.5 - 1
    np.testing.assert_allclose(image, expected.transpose(2, 0, 1), atol=1e-6)
    # cv2.INTER_NEAREST: source index floor(i · 20 / 8).
    source = np.arange(8) * 20 // 8
    np.testing.assert_array_equal(labels, (np.arange(400).reshape(20, 20) % 7)[source][:, source])
