"""Reading a feature store of either layout: `FeatureStore`."""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import dask
import dask.array
import numpy as np
import torch
import zarr
import zarr.codecs
from zarr.core.sync import sync

from pipeline.data.folders import ClassInfo
from pipeline.store.chunks import crc_digest, read_trailers
from pipeline.store.layouts import NATIVE, layout_named, store_arrays
from pipeline.store.locations import Location, holds_zarr_group, location_bytes, open_zarr_group, store_location
from pipeline.store.schema import (
    ALLOWED_CODECS,
    FORMAT_VERSION,
    NO_LABELS,
    READABLE_FORMATS,
    DamagedImageError,
    FeatureDescription,
    IncompleteImageError,
    StoreFormatError,
    StoreSchema,
    regions_sha256,
    select_features,
    tap_array,
)

logger = logging.getLogger(__name__)


def done_marks(group: zarr.Group, count: int) -> np.ndarray:
    """bool (N,): which images carry a done mark. An unreadable mark counts as not done."""
    try:
        return group["done"][:] == 1
    except (ValueError, RuntimeError):  # a damaged chunk of `done`: read the marks one by one
        marks = np.zeros(count, dtype=bool)
        for index in range(count):
            with contextlib.suppress(ValueError, RuntimeError):
                marks[index] = group["done"][index] == 1
        return marks


def read_schema(path: Location) -> StoreSchema:
    group = open_zarr_group(path, "r")
    document = group.attrs.get("segcache")
    if document is None:
        raise ValueError(f"{path} is a Zarr group but not a segcache feature store (no 'segcache' attribute)")
    if not isinstance(document, dict) or document.get("format") not in READABLE_FORMATS:
        found = document.get("format") if isinstance(document, dict) else None
        raise StoreFormatError(
            f"{path} was written in store format {found}; this version of segcache reads formats "
            f"{list(READABLE_FORMATS)} and writes format {FORMAT_VERSION}. Re-run extract into a new store (or let "
            "the DVC stage replace it)."
        )
    try:
        return StoreSchema.from_json(document)
    except (TypeError, KeyError, ValueError) as error:
        raise StoreFormatError(f"{path}: its 'segcache' attribute is malformed ({error!r})") from None


def check_arrays(group: zarr.Group, schema: StoreSchema, path: Path) -> None:
    """Refuses a store whose arrays are not exactly those segcache writes for this schema: other
    dtypes, shapes or chunks, or a codec outside `ALLOWED_CODECS` (nothing gets decoded by a codec
    a store's author chose, e.g. one that unpickles)."""
    for name, (dtype, shape, chunks) in store_arrays(schema).items():
        try:
            array = group[name]
        except KeyError:
            raise StoreFormatError(f"{path}: the array `{name}` is missing; not a complete segcache store") from None
        if not isinstance(array, zarr.Array):
            raise StoreFormatError(f"{path}: `{name}` is a group, expected an array")
        codecs = [codec.to_dict()["name"] for codec in array.metadata.codecs]
        problems = [
            f"{label} {found}, expected {expected}"
            for label, found, expected in (
                ("dtype", str(array.dtype), dtype), ("shape", array.shape, shape), ("chunks", array.chunks, chunks)
            )
            if found != expected
        ]
        problems += [f"codec {codec!r}, not one segcache writes" for codec in codecs if codec not in ALLOWED_CODECS]
        if problems:
            raise StoreFormatError(f"{path}: array `{name}` has {'; '.join(problems)}; refusing to read it")


class _TableCache:
    """A thread-safe LRU of native block tables, bounded in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: collections.OrderedDict[int, list[torch.Tensor]] = collections.OrderedDict()
        self.bytes = 0
        self.lock = threading.Lock()

    def get(self, key: int):
        with self.lock:
            if key in self.entries:
                self.entries.move_to_end(key)
                return self.entries[key]
        return None

    def put(self, key: int, tables: list[torch.Tensor]) -> None:
        size = sum(table.numel() * table.element_size() for table in tables)
        with self.lock:
            if key in self.entries or size > self.max_bytes:
                return
            self.entries[key] = tables
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, evicted = self.entries.popitem(last=False)
                self.bytes -= sum(table.numel() * table.element_size() for table in evicted)


class FeatureStore:
    """Reads a feature store of either layout through one API.

    Args:
        path: the store directory, or a URL fsspec reaches (s3://…, gs://…, memory://…).
        cache_megabytes: RAM for native block tables kept between reads (native layout).
        steps, taps: read only these of the store's steps and taps (None: all; taps by name or
            guided-diffusion block number): the pixel features, their dimension and the feature
            description are those of the selection, and a native store reads only the chosen taps.

    A pickled store is its location, cache size and selection: unpickled (on a Dask worker), it
    reopens the store there with an empty cache of its own.

    Raises:
        StoreMismatchError: the store lacks a chosen step or tap (the message lists what it has).
    """

    def __init__(
        self, path: str | Path, cache_megabytes: int = 512, steps: Sequence[int] | None = None,
        taps: Sequence[int | str] | None = None,
    ):
        self.path = store_location(path)
        self.cache_megabytes = cache_megabytes
        self._chosen = (None if steps is None else list(steps), None if taps is None else list(taps))
        if not holds_zarr_group(self.path):
            raise FileNotFoundError(f"no feature store at {self.path} (run `extract` first)")
        self.group = open_zarr_group(self.path, "r")
        self.schema = read_schema(self.path)
        check_arrays(self.group, self.schema, self.path)
        self.format = self.group.attrs["segcache"]["format"]
        self.code_version = self.group.attrs["segcache"].get("code_version")
        self._cache = _TableCache(cache_megabytes << 20)
        self._layout = layout_named(self.schema.layout)
        self.selection = select_features(self.schema, *self._chosen)

    def __getstate__(self) -> dict:
        return {"path": self.path, "cache_megabytes": self.cache_megabytes, "chosen": self._chosen}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["cache_megabytes"], *state["chosen"])

    # --- what the store holds -------------------------------------------------------------
    @property
    def layout(self) -> str:
        return self.schema.layout

    @property
    def image_size(self) -> int | list[int]:
        """As recorded: S for S×S, or [H, W]."""
        return self.schema.image_size

    @property
    def image_shape(self) -> tuple[int, int]:
        """(H, W) of the store's images."""
        return self.schema.image_shape

    @property
    def num_images(self) -> int:
        return len(self.schema.image_names)

    @property
    def image_names(self) -> list[str]:
        return list(self.schema.image_names)

    @property
    def feature_dim(self) -> int:
        """D: the width of a pixel's feature vector (of the selection)."""
        return self.selection.feature_dim

    def feature_description(self) -> FeatureDescription:
        """What a model trained on these features (the selection) must record to be applied to others."""
        return FeatureDescription.of(self.schema, self.selection)

    def class_info(self, given: ClassInfo | None = None) -> ClassInfo:
        """The class names and ignore label: `given` ones, else those recorded in the store.

        Raises:
            ValueError: none given and none recorded (the message says how to give them).
        """
        if given is not None:
            return given
        if self.schema.classes is None:
            raise ValueError(
                f"{self.path} records no class names; give them with --classes PATH/TO/classes.json "
                "(a JSON file with `names` and `ignore_label`)"
            )
        return ClassInfo(names=list(self.schema.classes["names"]), ignore_label=int(self.schema.classes["ignore_label"]))

    def done_mask(self) -> np.ndarray:
        """bool (N,): which images are completely written."""
        return done_marks(self.group, self.num_images)

    def check_done(self, index: int) -> None:
        """Raises IncompleteImageError (or IndexError) unless image `index` is completely written."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"image index {index} outside 0..{self.num_images - 1} in {self.path}")
        if not self.read_region("done", index) == 1:
            raise IncompleteImageError(
                f"image {index} ({self.schema.image_names[index]}) in {self.path} was not completely "
                "written; re-run extract to finish the store"
            )

    def read_region(self, array_name: str, index: int, *selection: slice) -> np.ndarray:
        """Reads (part of) one image's region. A chunk failing its CRC32C, or (format 3) missing
        where zarr would silently return its fill value, is a DamagedImageError."""
        array = self.group[array_name]
        try:
            missing = self._missing_chunks(array, index, selection) if array_name != "done" else []
            if not missing:
                return array[(index, *selection)]
            problem = f"chunk {missing[0]} is missing"
        except (ValueError, RuntimeError) as error:
            problem = str(error)
        raise DamagedImageError(
            f"image {index} ({self.schema.image_names[index]}) in {self.path}: `{array_name}` cannot be read "
            f"back ({problem}); delete the store (or copy it again) and re-run extract"
        )

    def _missing_chunks(self, array: zarr.Array, index: int, selection: Sequence[slice]) -> list[str]:
        """Keys of the chunks a read of image `index` needs that are not in the store."""
        ranges = [range(index, index + 1)]
        for axis, (length, chunk) in enumerate(zip(array.shape[1:], array.chunks[1:])):
            part = selection[axis] if axis < len(selection) else slice(0, length)
            ranges.append(range(part.start // chunk, -(-part.stop // chunk)))
        keys = [f"{array.path}/{array.metadata.encode_chunk_key(coords)}" for coords in itertools.product(*ranges)]
        return [key for key in keys if not sync(array.store.exists(key))]

    def _feature_array_names(self) -> list[str]:
        return list(self._layout.feature_arrays(self.schema))

    def verify_image(self, index: int) -> bool:
        """Whether an image's stored bytes still match the checksum recorded when it was written.

        Every chunk of the image is read and decoded (each checks its own CRC32C, and a missing
        one is damage), then the recorded checksum is compared with the one the stored chunks
        make: in format 5 from their CRC32C trailers, so a chunk rewritten whole, with a valid
        CRC32C of its own, is caught as well; in format 4 from the decoded values.
        """
        self.check_done(index)
        names = [*self._feature_array_names(), "labels", "images"]
        try:
            regions = [self.read_region(name, index) for name in names]
            recorded = self.read_region("checksums", index)
        except DamagedImageError:
            return False
        if self.format == 4:
            return bool(np.array_equal(regions_sha256(regions), recorded))
        trailers = [trailer for name in names for trailer in read_trailers(self.group[name], index)]
        return None not in trailers and bool(np.array_equal(crc_digest(trailers), recorded))

    def damaged_images(self) -> list[str]:
        """Names of the finished images whose bytes no longer match their checksums."""
        return [self.schema.image_names[i] for i in np.flatnonzero(self.done_mask()) if not self.verify_image(int(i))]

    # --- per image --------------------------------------------------------------------------
    def image(self, index: int) -> np.ndarray:
        """The resized input image, uint8 (H, W, 3)."""
        self.check_done(index)
        return self.read_region("images", index)

    def labels(self, index: int) -> np.ndarray | None:
        """The image's label map, int64 (S, S), or None when it has none."""
        self.check_done(index)
        labels = self.read_region("labels", index).astype(np.int64)
        return None if (labels == NO_LABELS).all() else labels

    def block_tables(self, index: int) -> list[torch.Tensor]:
        """Native layout: per chosen (step, tap) in feature order, float16 (C, h, w)."""
        if self._layout is not NATIVE:
            raise ValueError(f"{self.path} has the dense layout; block tables exist only in native stores")
        cached = self._cache.get(index)
        if cached is not None:
            return cached
        self.check_done(index)
        chosen = [tap_array(name) for name in self.selection.taps]  # only these arrays are read
        per_tap = [torch.from_numpy(self.read_region(name, index)) for name in chosen]  # each (T, C, h, w)
        tables = [maps[step] for step in self.selection.step_positions for maps in per_tap]
        self._cache.put(index, tables)
        return tables

    def pixel_features(self, index: int, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Feature vectors of chosen pixels of one image, float32 (P, D)."""
        features = np.empty((len(ys), self.feature_dim), dtype=np.float32)
        self.gather_pixel_features(index, ys, xs, features, slice(None))
        return features

    def gather_pixel_features(self, index: int, ys: np.ndarray, xs: np.ndarray, out: np.ndarray, rows) -> None:
        """Chosen pixels' features of one image written into `out[rows]` ((P, D) of any float
        dtype; `rows` any index), with no (P, D) float32 temporary in native stores (what
        training's float16 buffers use)."""
        ys, xs = np.asarray(ys, dtype=np.int64), np.asarray(xs, dtype=np.int64)
        self._layout.gather_into(self, index, ys, xs, out, rows)

    def image_features(self, index: int) -> np.ndarray:
        """All pixel features of one image, float16 (S, S, D)."""
        return self._layout.image_features(self, index)

    # --- everything, lazily -----------------------------------------------------------------
    def to_dask(self) -> dask.array.Array:
        """A lazy float16 (N, S, S, D) Dask array of every pixel feature (one chunk per image
        for native stores, the store's tiles for dense ones)."""
        return self._layout.to_dask(self)

    def disk_bytes(self) -> int:
        """Bytes the store takes on disk (or in object storage)."""
        return location_bytes(self.path)

