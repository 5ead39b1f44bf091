"""Label maps to and from COCO JSON with RLE masks, the format labeling tools (CVAT, Label
Studio, makesense…) import as pre-annotations and export after a person corrects them.

- Categories: one per class, `id` = class index + 1 (COCO keeps 0 for "no category"), `name` =
  the class name. Reading back, categories are matched to the classes by name, so a tool that
  renumbers them still reads right.
- Annotations: one per (image, class present), its pixels as a compressed RLE (pycocotools),
  with area and bbox, `iscrowd` 0. Polygons and uncompressed RLEs, as tools also export, read too.
- Pixels of the ignore label get no annotation. Reading back, a pixel that no annotation covers
  is the ignore label: a mask a person deleted becomes "not labeled", never silently background.
- Images are matched to a folder's images by file name (any folder part of `file_name` dropped).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.data.folders import ClassInfo, ImageRecord

DEFAULT_IGNORE_LABEL = 255


class CocoError(ValueError):
    """A COCO file that does not fit the images or classes it is read against."""


class CocoBuilder:
    """A COCO dict built one image at a time (each mask is RLE-encoded as it comes, so a folder
    of any size costs the RLEs' memory, not the label maps')."""

    def __init__(self, classes: ClassInfo):
        self.classes = classes
        self.coco = {"images": [], "annotations": [],
                     "categories": [{"id": index + 1, "name": name} for index, name in enumerate(classes.names)]}

    def add(self, file_name: str, labels: np.ndarray) -> None:
        """One image's int label map (H, W): one annotation per class present (not the ignore label)."""
        height, width = labels.shape
        image_id = len(self.coco["images"]) + 1
        self.coco["images"].append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for class_index in np.unique(labels):
            if class_index == self.classes.ignore_label:
                continue
            rle = mask_utils.encode(np.asfortranarray(labels == class_index, dtype=np.uint8))
            self.coco["annotations"].append({
                "id": len(self.coco["annotations"]) + 1, "image_id": image_id, "category_id": int(class_index) + 1,
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                "area": int(mask_utils.area(rle)), "bbox": [float(value) for value in mask_utils.toBbox(rle)],
                "iscrowd": 0,
            })


def label_maps_to_coco(label_maps: Sequence[tuple[str, np.ndarray]], classes: ClassInfo) -> dict:
    """(file name, int label map (H, W)) pairs → a COCO dict (images, categories, annotations)."""
    builder = CocoBuilder(classes)
    for file_name, labels in label_maps:
        builder.add(file_name, labels)
    return builder.coco


def write_coco(path: str | Path, coco: dict) -> Path:
    path = Path(path)
    path.write_text(json.dumps(coco))
    return path


def read_coco(path: str | Path) -> dict:
    """A COCO file's content. Raises CocoError naming the file when it is not COCO JSON."""
    path = Path(path)
    try:
        coco = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CocoError(f"cannot read COCO file {path}: {error}") from None
    if not isinstance(coco, dict) or not all(isinstance(coco.get(key), list) for key in ("images", "annotations", "categories")):
        raise CocoError(f"{path} is not a COCO file: it needs lists `images`, `annotations` and `categories`")
    return coco


def coco_to_label_maps(coco: dict, source: str | Path, image_shapes: Mapping[str, tuple[int, int]],
                       classes: ClassInfo) -> dict[str, np.ndarray]:
    """A COCO dict's masks as label maps, checked against a folder's images and the classes.

    Args:
        source: the COCO file, for messages.
        image_shapes: the folder's images: file name → (H, W).

    Returns:
        file name → int64 label map (H, W), for each image the COCO file lists.

    Raises:
        CocoError: an image the folder lacks, a size other than the image's, a category no class
            is named for, an annotation of an unknown image or category, masks of two classes
            that overlap, or a segmentation that cannot be decoded.
    """
    class_of_category = _class_of_category(coco["categories"], source, classes)
    images = {}
    stems: dict[str, list[str]] = {}
    for name in image_shapes:
        stems.setdefault(Path(name).stem, []).append(name)
    for entry in coco["images"]:
        file_name = _folder_file(entry, image_shapes, stems)
        if file_name is None:
            unknown = [str(other.get("file_name")) for other in coco["images"]
                       if _folder_file(other, image_shapes, stems) is None]
            raise CocoError(f"{source}: {len(unknown)} image(s) are not in the folder: {', '.join(unknown[:5])}"
                            + (" …" if len(unknown) > 5 else ""))
        if (entry.get("height"), entry.get("width")) != tuple(image_shapes[file_name]):
            raise CocoError(f"{source}: image {file_name} is {entry.get('height')}×{entry.get('width')} there but "
                            f"{image_shapes[file_name][0]}×{image_shapes[file_name][1]} in the folder")
        images[entry["id"]] = file_name
    label_maps = {name: np.full(image_shapes[name], classes.ignore_label, dtype=np.int64) for name in images.values()}
    for annotation in coco["annotations"]:
        if annotation.get("image_id") not in images:
            raise CocoError(f"{source}: annotation {annotation.get('id')} is of image id {annotation.get('image_id')}, "
                            "which `images` does not list")
        if annotation.get("category_id") not in class_of_category:
            raise CocoError(f"{source}: annotation {annotation.get('id')} has category id "
                            f"{annotation.get('category_id')}, which `categories` does not list")
        name = images[annotation["image_id"]]
        labels, class_index = label_maps[name], class_of_category[annotation["category_id"]]
        mask = _decode(annotation, labels.shape, source, name)
        clash = mask & (labels != classes.ignore_label) & (labels != class_index)
        if clash.any():
            other = classes.names[int(np.bincount(labels[clash]).argmax())]
            raise CocoError(f"{source}: in image {name}, masks of `{classes.names[class_index]}` and `{other}` overlap "
                            f"at {int(clash.sum())} pixels; each pixel may belong to one class only")
        labels[mask] = class_index
    return label_maps


def _folder_file(entry: dict, image_shapes: Mapping[str, tuple[int, int]], stems: Mapping[str, list[str]]) -> str | None:
    """The folder's file an entry of `images` names: by file name (any folder part dropped), else
    by name without extension (a tool that converted the images, or `suggest`, which knows the
    names only); None when neither matches one image."""
    file_name = Path(str(entry.get("file_name", ""))).name
    if file_name in image_shapes:
        return file_name
    same_stem = stems.get(Path(file_name).stem, [])
    return same_stem[0] if len(same_stem) == 1 else None


def _class_of_category(categories: list, source, classes: ClassInfo) -> dict[int, int]:
    class_of_name = {name: index for index, name in enumerate(classes.names)}
    unknown = [str(category.get("name")) for category in categories if category.get("name") not in class_of_name]
    if unknown:
        raise CocoError(f"{source}: categories {unknown[:5]} are no class of {classes.names}")
    return {category["id"]: class_of_name[category["name"]] for category in categories}


def _decode(annotation: dict, shape: tuple[int, int], source, name: str) -> np.ndarray:
    """An annotation's segmentation (RLE or polygons) as a bool mask (H, W)."""
    height, width = shape
    segmentation = annotation.get("segmentation")
    try:
        if isinstance(segmentation, dict):
            if list(segmentation.get("size", [])) != [height, width]:
                raise CocoError(f"{source}: annotation {annotation.get('id')} of image {name} is "
                                f"{segmentation.get('size')}, the image {height}×{width}")
            counts = segmentation["counts"]
            rle = (mask_utils.frPyObjects(segmentation, height, width) if isinstance(counts, list)
                   else {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts})
        else:  # polygons: a list of [x0, y0, x1, y1, …]
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
        return mask_utils.decode(rle).astype(bool)
    except CocoError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise CocoError(f"{source}: annotation {annotation.get('id')} of image {name}: cannot decode its "
                        f"segmentation ({error})") from None


def coco_class_info(coco: dict) -> ClassInfo:
    """Classes from a COCO file's categories, in id order (ignore label 255), for a folder with no classes.json."""
    return ClassInfo([str(category["name"]) for category in sorted(coco["categories"], key=lambda c: c["id"])],
                     DEFAULT_IGNORE_LABEL)


@contextlib.contextmanager
def records_with_coco_labels(records: list[ImageRecord], coco_path: str | Path,
                             classes: ClassInfo) -> Iterator[list[ImageRecord]]:
    """A folder's records, those the COCO file lists given its masks as label maps: written as
    `.npy` files in a temporary folder that lives while the block runs (so every reader of label
    maps, Dask workers on this machine included, reads them as it reads a folder's own).

    Raises:
        CocoError: what `coco_to_label_maps` refuses, and an image that has both a `.npy` label
            map in its folder and masks in the COCO file (which one is meant is not clear).
    """
    coco = read_coco(coco_path)
    by_file = {record.image_path.name: record for record in records}
    shapes = {}
    for name, record in by_file.items():
        with Image.open(record.image_path) as image:
            shapes[name] = image.size[::-1]  # PIL's (W, H) → (H, W)
    label_maps = coco_to_label_maps(coco, coco_path, shapes, classes)
    both = [name for name in label_maps if by_file[name].label_path is not None]
    if both:
        raise CocoError(f"{coco_path}: {', '.join(both[:5])} also have .npy label maps in their folder; "
                        "keep one source of labels per image")
    with tempfile.TemporaryDirectory(prefix="segcache-coco-labels-") as folder:
        labeled = []
        for record in records:
            if record.image_path.name in label_maps:
                path = Path(folder) / f"{record.name}.npy"
                np.save(path, label_maps[record.image_path.name].astype(np.int16))
                record = dataclasses.replace(record, label_path=path)
            labeled.append(record)
        yield labeled
