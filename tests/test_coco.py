"""Label maps to and from COCO JSON with RLE masks: what labeling tools import and export."""

import json

import numpy as np
import pytest
from PIL import Image

from pipeline.data.coco import CocoError, coco_to_label_maps, label_maps_to_coco, read_coco, records_with_coco_labels
from pipeline.data.folders import ClassInfo, list_images

CLASSES = ClassInfo(["background", "disc", "square"], 255)


def _maps(seed=0):
    rng = np.random.default_rng(seed)
    first = rng.integers(0, 3, (20, 30))
    first[0, :7] = 255  # not labeled
    return [("a.png", first), ("b.png", np.full((12, 16), 2))]


def test_label_maps_survive_a_round_trip_through_json():
    maps = _maps()
    coco = json.loads(json.dumps(label_maps_to_coco(maps, CLASSES)))  # what a file holds
    assert [category["name"] for category in coco["categories"]] == CLASSES.names
    assert len(coco["annotations"]) == 3 + 1  # one per (image, class present); none for the ignore label
    back = coco_to_label_maps(coco, "annotations.json", {"a.png": (20, 30), "b.png": (12, 16)}, CLASSES)
    for name, labels in maps:
        assert back[name].dtype == np.int64 and np.array_equal(back[name], labels)


def test_tools_renumbering_categories_and_drawing_polygons_read_right():
    coco = {"images": [{"id": 7, "file_name": "exports/a.png", "height": 10, "width": 10}],
            "categories": [{"id": 40, "name": "square"}, {"id": 41, "name": "disc"}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 40, "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]]}]}
    labels = coco_to_label_maps(coco, "f", {"a.png": (10, 10)}, CLASSES)["a.png"]
    assert (labels[:4, :4] == 2).all() and (labels[6:, 6:] == 255).all()  # uncovered pixels: not labeled


@pytest.mark.parametrize(("change", "message"), [
    (lambda coco: coco["images"][0].update(file_name="elsewhere.png"), "not in the folder: elsewhere.png"),
    (lambda coco: coco["images"][0].update(height=21), "is 21×30 there but 20×30 in the folder"),
    (lambda coco: coco["categories"].append({"id": 9, "name": "cat"}), "categories \\['cat'\\] are no class"),
    (lambda coco: coco["annotations"][0].update(category_id=99), "category id 99, which `categories` does not list"),
    (lambda coco: coco["annotations"][0].update(image_id=99), "image id 99, which `images` does not list"),
    (lambda coco: coco["annotations"][0].update(segmentation={"size": [20, 30], "counts": 5}), "cannot decode"),
    (lambda coco: coco["annotations"].append({**coco["annotations"][1], "id": 50, "category_id": 3}), "overlap"),
])
def test_a_file_that_does_not_fit_the_folder_is_refused_by_name(change, message):
    coco = json.loads(json.dumps(label_maps_to_coco(_maps()[:1], CLASSES)))
    change(coco)
    with pytest.raises(CocoError, match=message):
        coco_to_label_maps(coco, "annotations.json", {"a.png": (20, 30)}, CLASSES)


def test_not_a_coco_file_is_refused(tmp_path):
    (tmp_path / "x.json").write_text('{"images": []}')
    with pytest.raises(CocoError, match="x.json is not a COCO file"):
        read_coco(tmp_path / "x.json")


def test_records_take_their_labels_from_the_file_and_refuse_two_sources(tmp_path):
    for name, labels in _maps():
        Image.fromarray(np.zeros((*labels.shape, 3), np.uint8)).save(tmp_path / name)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "c.png")  # not in the file: no labels
    (tmp_path / "annotations.json").write_text(json.dumps(label_maps_to_coco(_maps(), CLASSES)))
    with records_with_coco_labels(list_images(tmp_path), tmp_path / "annotations.json", CLASSES) as records:
        by_name = {record.name: record for record in records}
        assert np.array_equal(np.load(by_name["a"].label_path), _maps()[0][1]) and by_name["c"].label_path is None
        folder = by_name["a"].label_path.parent
    assert not folder.exists()  # the temporary label maps are gone with the block
    np.save(tmp_path / "b.npy", np.zeros((12, 16), np.int64))
    with pytest.raises(CocoError, match="b.png also have .npy label maps"), \
            records_with_coco_labels(list_images(tmp_path), tmp_path / "annotations.json", CLASSES):
        pass
