"""Stored predictions: what the evaluation's predict step writes and its score and report steps read.

A predictions folder is a Zarr v3 group, one chunk per image along the first axis:

- `probabilities` float16 (N, K, S, S): per pixel, the members' mean softmax (or, for refined
  predictions, the refiner's class probabilities).
- `labels` int16 (N, S, S): the labels that are scored and drawn. For an ensemble these are
  the mode of the members' votes (the paper's rule), which is not always the argmax of the
  mean probabilities; a writer given no labels stores the argmax of the float16 probabilities
  as stored (ties: the smallest class).
- `uncertainty` float16 (N, S, S), optional: a per-pixel uncertainty map (the ensemble's
  Jensen–Shannon disagreement), and `uncertainty_score` float64 (N,): its per-image score
  (mean of the top decile), computed from the float32 map before rounding.
- `done` uint8 (N,): 1 once an image is completely written; readers refuse the others.

Attributes (`segcache_predictions`): format, image_names, class_names, ignore_label,
image_size (S for S×S, or [H, W]), has_uncertainty, and `provenance` (free-form: what predicted them, from what).

A refiner reads a folder with `Predictions`, writes its output with `create_predictions` and
`PredictionsWriter.write`, and `score_predictions` scores either the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import zarr
import zarr.codecs

from pipeline.metrics import top_decile_mean
from pipeline.sizes import as_shape, recorded_size

logger = logging.getLogger(__name__)

FORMAT = 1
ATTRIBUTE = "segcache_predictions"


def _compressors() -> list:
    # zstd, then a CRC32C so that every read checks its chunk (as the feature stores do)
    return [zarr.codecs.ZstdCodec(level=3), zarr.codecs.Crc32cCodec()]


class PredictionsWriter:
    """Writes images into a predictions folder created by `create_predictions`.

    Each image is its own region of every array, so images can be written in any order.
    """

    def __init__(self, group: zarr.Group):
        self.group = group
        self.attributes = dict(group.attrs[ATTRIBUTE])

    def write(
        self,
        position: int,
        probabilities: np.ndarray,
        labels: np.ndarray | None = None,
        uncertainty: np.ndarray | None = None,
    ) -> None:
        """Writes image `position` (its place in `image_names`).

        Args:
            probabilities: float (K, H, W), stored as float16.
            labels: int (H, W); None: the argmax of the stored float16 probabilities.
            uncertainty: float32 (H, W), required when the folder was created with uncertainty.
        """
        shape, num_classes = as_shape(self.attributes["image_size"]), len(self.attributes["class_names"])
        if probabilities.shape != (num_classes, *shape):
            raise ValueError(f"probabilities of shape {probabilities.shape}; expected {(num_classes, *shape)}")
        stored = probabilities.astype(np.float16)
        if labels is None:
            labels = stored.argmax(axis=0)
        if labels.shape != shape:
            raise ValueError(f"labels of shape {labels.shape}; expected {shape}")
        if self.attributes["has_uncertainty"] != (uncertainty is not None):
            raise ValueError(
                f"{self.group.store} was created {'with' if self.attributes['has_uncertainty'] else 'without'} "
                "an uncertainty map: give one with every image, or none with any"
            )
        self.group["probabilities"][position] = stored
        self.group["labels"][position] = labels.astype(np.int16)
        if uncertainty is not None:
            self.group["uncertainty"][position] = uncertainty.astype(np.float16)
            self.group["uncertainty_score"][position] = top_decile_mean(uncertainty)
        self.group["done"][position] = 1  # last: the image is complete


def create_predictions(
    path: str | Path,
    image_names: Sequence[str],
    class_names: Sequence[str],
    ignore_label: int,
    image_size: int | Sequence[int],
    has_uncertainty: bool,
    provenance: dict | None = None,
) -> PredictionsWriter:
    """Creates an empty predictions folder with its full schema (replacing one at `path`)."""
    if len(set(image_names)) != len(image_names):
        raise ValueError(f"image names repeat in {list(image_names)[:10]}…: predictions are looked up by name")
    count, (height, width), num_classes = len(image_names), as_shape(image_size), len(class_names)
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.attrs[ATTRIBUTE] = {
        "format": FORMAT, "image_names": list(image_names), "class_names": list(class_names),
        "ignore_label": int(ignore_label), "image_size": recorded_size((height, width)), "has_uncertainty": bool(has_uncertainty),
        "provenance": provenance or {},
    }
    arrays = {
        "probabilities": ((count, num_classes, height, width), "float16", np.nan),
        "labels": ((count, height, width), "int16", -1),
        "done": ((count,), "uint8", 0),
    }
    if has_uncertainty:
        arrays["uncertainty"] = ((count, height, width), "float16", np.nan)
        arrays["uncertainty_score"] = ((count,), "float64", np.nan)
    for name, (shape, dtype, fill_value) in arrays.items():
        group.create_array(
            name, shape=shape, chunks=(1, *shape[1:]), dtype=dtype, fill_value=fill_value, compressors=_compressors()
        )
    return PredictionsWriter(group)


class Predictions:
    """Reads a predictions folder.

    Args:
        path: the folder `create_predictions` made.

    Raises:
        FileNotFoundError: no predictions folder there.
        ValueError: a folder of another format.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise FileNotFoundError(f"no predictions at {self.path} (run the evaluation's predict step first)")
        self.group = zarr.open_group(str(self.path), mode="r", zarr_format=3)
        attributes = self.group.attrs.get(ATTRIBUTE)
        if attributes is None or attributes.get("format") != FORMAT:
            found = None if attributes is None else attributes.get("format")
            raise ValueError(f"{self.path} holds predictions of format {found}; this version reads format {FORMAT}")
        self.attributes = attributes
        self._positions = {name: position for position, name in enumerate(self.image_names)}

    @property
    def image_names(self) -> list[str]:
        return list(self.attributes["image_names"])

    @property
    def class_names(self) -> list[str]:
        return list(self.attributes["class_names"])

    @property
    def num_classes(self) -> int:
        return len(self.attributes["class_names"])

    @property
    def ignore_label(self) -> int:
        return int(self.attributes["ignore_label"])

    @property
    def image_size(self) -> int | list[int]:
        """As recorded: S for S×S, or [H, W]."""
        return self.attributes["image_size"]

    @property
    def image_shape(self) -> tuple[int, int]:
        return as_shape(self.attributes["image_size"])

    @property
    def has_uncertainty(self) -> bool:
        return bool(self.attributes["has_uncertainty"])

    @property
    def provenance(self) -> dict:
        return dict(self.attributes["provenance"])

    def __len__(self) -> int:
        return len(self.attributes["image_names"])

    def position(self, name: str) -> int:
        """Where image `name` is along the first axis."""
        if name not in self._positions:
            raise KeyError(f"no image {name!r} in the predictions at {self.path}")
        return self._positions[name]

    def done_mask(self) -> np.ndarray:
        """bool (N,): which images are completely written."""
        return self.group["done"][:] == 1

    def _check_done(self, position: int) -> None:
        if not 0 <= position < len(self):
            raise IndexError(f"image position {position} outside 0..{len(self) - 1} in {self.path}")
        if self.group["done"][position] != 1:
            raise ValueError(f"image {self.image_names[position]!r} in {self.path} was not completely written")

    def probabilities(self, position: int) -> np.ndarray:
        """float32 (K, S, S), from the stored float16."""
        self._check_done(position)
        return self.group["probabilities"][position].astype(np.float32)

    def labels(self, position: int) -> np.ndarray:
        """int64 (S, S): the labels that are scored."""
        self._check_done(position)
        return self.group["labels"][position].astype(np.int64)

    def uncertainty(self, position: int) -> np.ndarray | None:
        """float32 (S, S) from the stored float16, or None when the folder has no uncertainty."""
        self._check_done(position)
        return self.group["uncertainty"][position].astype(np.float32) if self.has_uncertainty else None

    def uncertainty_score(self, position: int) -> float | None:
        """The image's uncertainty score (top-decile mean of its float32 map), or None."""
        self._check_done(position)
        return float(self.group["uncertainty_score"][position]) if self.has_uncertainty else None
