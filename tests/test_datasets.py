import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from conftest import write_image_folder
from pipeline.datasets import file_sha256, find_class_info, list_images, load_image, load_label_map


def test_file_sha256_streams_large_files(tmp_path):
    path = tmp_path / "blob.bin"
    content = bytes(range(256)) * 9000  # 2.2 MiB: several 1 MiB reads
    path.write_bytes(content)
    assert file_sha256(path) == hashlib.sha256(content).hexdigest()


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
    from pipeline.datasets import ClassInfo, check_examples, check_labels_complete, load_example

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
    with pytest.raises(ValueError, match="wide.png is 10×8, not square"):
        check_examples(list_images(tmp_path), classes)
