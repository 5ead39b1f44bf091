"""Image folders in the paper's format: images with same-stem `.npy` label maps beside them."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.sizes import as_shape

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """One image file and its label map, if it has one."""

    name: str
    image_path: Path
    label_path: Path | None


@dataclasses.dataclass(frozen=True)
class ClassInfo:
    """Class names and the ignore label of a dataset (`classes.json`)."""

    names: list[str]
    ignore_label: int

    @property
    def num_classes(self) -> int:
        return len(self.names)


def check_labels_complete(records: list[ImageRecord], folder: str | Path) -> None:
    """A folder is labeled throughout or not at all: a few images without `.npy` maps among
    labeled ones are almost surely a mistake.

    Raises:
        ValueError: naming the images that have no label map.
    """
    missing = [record.image_path.name for record in records if record.label_path is None]
    if 0 < len(missing) < len(records):
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise ValueError(
            f"{folder}: {len(missing)} of {len(records)} images have no label map (same-stem .npy): {shown}"
        )


def require_label_maps(records: list[ImageRecord], folder: str | Path) -> None:
    """Every image of a labeled split (train or test of a benchmark) needs its label map.

    Raises:
        ValueError: naming the images that have no same-stem `.npy` label map.
    """
    missing = [record.image_path.name for record in records if record.label_path is None]
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise ValueError(
            f"{folder}: {len(missing)} of {len(records)} images have no label map (same-stem .npy): {shown}"
        )


def first_images(records: list[ImageRecord], count: int, folder: str | Path) -> list[ImageRecord]:
    """The paper's protocol: the first `count` images in sorted order (0: all of them).

    Raises:
        ValueError: when the folder holds fewer than `count` images.
    """
    if count > len(records):
        raise ValueError(f"{folder} holds {len(records)} images but the protocol uses the first {count}")
    return records[:count] if count else list(records)


def list_images(folder: str | Path) -> list[ImageRecord]:
    """Lists the images of a folder in sorted order, with their label maps.

    Raises:
        FileNotFoundError: if the folder does not exist.
        ValueError: if it holds no PNG/JPEG image, or two images share a stem.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    # Sorted by file name, as the official code sorts its paths (so "10.png" comes before "2.png").
    image_paths = sorted(
        (path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES), key=lambda path: path.name
    )
    if not image_paths:
        raise ValueError(f"no PNG or JPEG images in {folder}")
    stems = [path.stem for path in image_paths]
    repeated = sorted({stem for stem in stems if stems.count(stem) > 1})
    if repeated:
        raise ValueError(f"{folder}: several images share the name(s) {repeated}; names must be unique")
    records = []
    for path in image_paths:
        label_path = path.with_suffix(".npy")
        records.append(ImageRecord(path.stem, path, label_path if label_path.is_file() else None))
    return records


def _open_rgb(record: ImageRecord) -> Image.Image:
    try:
        with Image.open(record.image_path) as image:
            if image.mode in ("I", "I;16", "I;16B", "I;16L"):
                # 16-bit grayscale: keep the high byte, as PIL does for 16-bit RGB (convert() would clip to white).
                image = Image.fromarray(np.clip(np.asarray(image, dtype=np.int64) >> 8, 0, 255).astype(np.uint8))
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"cannot read image {record.image_path}: {error}") from None


def _to_model_input(rgb: Image.Image, size: int | Sequence[int]) -> np.ndarray:
    height, width = as_shape(size)
    if rgb.size != (width, height):
        # Bilinear, as the official code's torchvision Resize does on PIL images.
        rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(rgb, dtype=np.float32)  # (H, W, 3) in 0..255
    return pixels.transpose(2, 0, 1) / 127.5 - 1.0


def load_image(record: ImageRecord, size: int | Sequence[int]) -> np.ndarray:
    """Loads an image of any size and mode as the model's input, resized to `size` (S: S×S, or (H, W)).

    Returns:
        float32 array (3, H, W) scaled to [-1, 1].

    Raises:
        ValueError: naming the file if it cannot be decoded.
    """
    return _to_model_input(_open_rgb(record), size)


def load_example(
    record: ImageRecord, size: int | Sequence[int], classes: ClassInfo | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """An image and its label map as the feature store keeps them, checked, both resized to
    `size` (S: S×S, or (H, W); the paper's protocol resizes, never crops). The label map must
    have the image's height and width and, when `classes` is given, hold only class indices
    and the ignore label.

    Returns:
        (float32 (3, H, W) in [-1, 1], int64 (H, W) labels or None).

    Raises:
        ValueError: naming the file and the problem.
    """
    rgb = _open_rgb(record)
    labels = _checked_labels(record, rgb.size, size, classes)
    return _to_model_input(rgb, size), labels


def check_examples(records: list[ImageRecord], classes: ClassInfo | None = None) -> list[tuple[int, int]]:
    """Checks every image (decoded in full) and label map before hours of extraction start.

    Returns:
        Each image's own (H, W), in order.

    Raises:
        ValueError: naming the first file that `load_example` would refuse.
    """
    shapes = []
    for record in records:
        try:
            with Image.open(record.image_path) as image:
                image_size = image.size
                image.load()  # decode it all: a truncated or corrupt file is refused before anything is written
        except (OSError, SyntaxError, ValueError) as error:
            raise ValueError(f"cannot read image {record.image_path}: {error}") from None
        _checked_labels(record, image_size, image_size[::-1], classes)  # at full size: every value checked
        shapes.append(image_size[::-1])  # PIL's (W, H) → (H, W)
    return shapes


def _checked_labels(
    record: ImageRecord, image_size: tuple[int, int], size: int | Sequence[int], classes: ClassInfo | None
) -> np.ndarray | None:
    width, height = image_size  # PIL's order
    labels = load_label_map(record, size, expected_shape=(height, width))
    if labels is not None and classes is not None:
        valid = ((labels >= 0) & (labels < classes.num_classes)) | (labels == classes.ignore_label)
        if not valid.all():
            bad = np.unique(labels[~valid])[:10].tolist()
            raise ValueError(
                f"label map {record.label_path} holds {bad}: neither a class (0..{classes.num_classes - 1}) "
                f"nor the ignore label {classes.ignore_label}"
            )
    return labels


def model_input_to_uint8(image: np.ndarray) -> np.ndarray:
    """The inverse of `load_image`'s scaling: (3, H, W) in [-1, 1] → uint8 (H, W, 3)."""
    return np.clip(np.round((image.transpose(1, 2, 0) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def load_label_map(
    record: ImageRecord, size: int | Sequence[int], expected_shape: tuple[int, int] | None = None
) -> np.ndarray | None:
    """Loads an image's label map, resized by nearest neighbour.

    Output pixel i takes source pixel floor(i · in / out), in exact integer arithmetic. This is
    `torch.nn.functional.interpolate(mode="nearest")`'s rule, and gives the same maps for the sizes
    we use (32→32, 256→256, 512→256, 20→32; tests/test_folders.py checks it), but the index
    arithmetic stays: interpolate has no int16/int32/int64 kernels (labels would go through float),
    and it computes in/out as a float32 scale, which moves some pixels at other sizes (39→33 and
    84→100 among them). "nearest-exact" is another rule (floor((i + ½) · in / out)).

    Args:
        record: the image and its label map.
        size: what it is resized to: S (S×S) or (H, W).
        expected_shape: (height, width) the map must have (the image's own), if known.

    Returns:
        int64 array (H, W), or None when the image has no label map.

    Raises:
        ValueError: naming the file when it is not a 2-d integer array.
    """
    if record.label_path is None:
        return None
    try:
        labels = np.load(record.label_path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read label map {record.label_path}: {error}") from None
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"label map {record.label_path} must be a 2-d integer array, got shape {labels.shape} "
            f"dtype {labels.dtype}"
        )
    if expected_shape is not None and labels.shape != expected_shape:
        raise ValueError(
            f"label map {record.label_path} is {labels.shape[0]}×{labels.shape[1]} but its image "
            f"{record.image_path.name} is {expected_shape[0]}×{expected_shape[1]}"
        )
    return resize_nearest(labels, as_shape(size)).astype(np.int64)


def resize_nearest(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A label map (h, w) at `shape` (H, W) by nearest neighbour: output pixel i takes source
    pixel floor(i · in / out) along each axis (see `load_label_map`); the same array if it fits."""
    out_height, out_width = shape
    height, width = labels.shape
    if (height, width) == (out_height, out_width):
        return labels
    rows = (np.arange(out_height) * height // out_height)[:, None]
    columns = (np.arange(out_width) * width // out_width)[None, :]
    return labels[rows, columns]  # (H, W)


def find_class_info(images_folder: str | Path) -> ClassInfo | None:
    """Reads `classes.json` from the image folder or one of its two parents, if there is one."""
    folder = Path(images_folder).resolve()
    for candidate in (folder, folder.parent, folder.parent.parent):
        path = candidate / "classes.json"
        if path.is_file():
            return load_class_info(path)
    return None


def load_class_info(path: str | Path) -> ClassInfo:
    """Reads a `classes.json` with `names` and `ignore_label`."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
        names = [str(name) for name in document["names"]]
        ignore_label = int(document["ignore_label"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: expected JSON with `names` and `ignore_label`: {error}") from None
    return ClassInfo(names=names, ignore_label=ignore_label)
