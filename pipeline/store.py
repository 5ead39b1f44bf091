"""The feature store: a Zarr v3 group of float16 diffusion features, one region per image.

Layout of a store (all chunks hold exactly one image, so images are written independently):

    attrs["segcache"]         schema and provenance (see `StoreSchema`)
    images   (N, S, S, 3)     uint8, the resized input images
    labels   (N, S, S)        int16, label maps; -1 where an image has no labels
    done     (N,)             uint8, 1 once every array of that image is written
    native layout:  block_<b> (N, T, C_b, h_b, w_b) float16 — each block at its own resolution,
                    T steps in feature order
    dense layout:   pixels    (N, S, S, D) float16 — upsampled pixel features, chunked in tiles

Pixel features are in the paper's order: step-major, then blocks in the given order. A native
store makes any pixel's D-dimensional vector on demand (`pipeline.features`); a dense store
holds them written out. Both are read through `FeatureStore`.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
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

from pipeline.features import gather_pixels_from_blocks, upsample_and_concatenate
from pipeline.storage import (
    Location,
    holds_zarr_group,
    location_bytes,
    location_exists,
    open_zarr_group,
    remove_location,
    store_location,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: per-image checksums and CRC32C chunks
DENSE_TILE = 32
NO_LABELS = -1


class StoreMismatchError(ValueError):
    """The store holds other features than those asked for."""


class IncompleteImageError(ValueError):
    """An image's features were not (completely) written."""


class StoreFormatError(ValueError):
    """The store was written in another format version."""


class DamagedImageError(ValueError):
    """An image's stored bytes fail their checksum."""


@dataclasses.dataclass(frozen=True)
class BlockShape:
    """One decoder block's activation shape for one image (the same at every step)."""

    block: int
    channels: int
    height: int
    width: int


@dataclasses.dataclass(frozen=True)
class StoreSchema:
    """Everything that defines a store's contents; two extractions with equal schemas are the same.

    Attributes:
        layout: "native" or "dense".
        image_size: S, the model input size.
        steps: diffusion steps, in feature order.
        block_shapes: per block in feature order, its activation shape.
        checkpoint_sha256: hash of the model weights file.
        architecture: the UNet's configuration.
        noise_seed: seed of the shared noise.
        image_names: the images, in store order.
        image_sha256: their file hashes.
        classes: {"names": [...], "ignore_label": int} when known, else None.
    """

    layout: str
    image_size: int
    steps: list[int]
    block_shapes: list[BlockShape]
    checkpoint_sha256: str
    architecture: dict
    noise_seed: int
    image_names: list[str]
    image_sha256: list[str]
    classes: dict | None = None

    @property
    def blocks(self) -> list[int]:
        return [shape.block for shape in self.block_shapes]

    @property
    def feature_dim(self) -> int:
        return len(self.steps) * sum(shape.channels for shape in self.block_shapes)

    def to_json(self) -> dict:
        document = dataclasses.asdict(self)
        document["format"] = FORMAT_VERSION
        return document

    @classmethod
    def from_json(cls, document: dict) -> StoreSchema:
        fields = {key: value for key, value in document.items() if key not in ("format", "code_version")}
        fields["block_shapes"] = [BlockShape(**shape) for shape in fields["block_shapes"]]
        return cls(**fields)


def _compressors(codec: str) -> list:
    """The chunk codecs: the compressor, then a CRC32C that makes every read check its chunk."""
    if codec == "blosc-lz4":
        compressors = [zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]
    elif codec == "zstd":
        compressors = [zarr.codecs.ZstdCodec(level=3)]
    elif codec == "none":
        compressors = []
    else:
        raise ValueError(f"unknown codec {codec!r}; use blosc-lz4, zstd or none")
    return [*compressors, zarr.codecs.Crc32cCodec()]


def image_digest(regions: Sequence[np.ndarray]) -> np.ndarray:
    """sha256 of an image's stored regions (features, labels, image) in a fixed order, uint8 (32,)."""
    digest = hashlib.sha256()
    for region in regions:
        digest.update(np.ascontiguousarray(region).tobytes())
    return np.frombuffer(digest.digest(), dtype=np.uint8)


def _schema_differences(stored: StoreSchema, wanted: StoreSchema) -> list[str]:
    differences = []
    for field in dataclasses.fields(StoreSchema):
        if getattr(stored, field.name) != getattr(wanted, field.name):
            differences.append(field.name)
    return differences


class FeatureStoreWriter:
    """Writes images into a store created from its full schema up front."""

    def __init__(self, group: zarr.Group, schema: StoreSchema, location: Location):
        self.group = group
        self.schema = schema
        self.location = location

    def pending_images(self) -> list[int]:
        """Indices of images not yet completely written."""
        done = self.group["done"][:]
        return [int(index) for index in np.flatnonzero(done == 0)]

    def pending_among(self, indices: Sequence[int]) -> list[int]:
        """Those of `indices` not yet completely written (reads only their done marks)."""
        done = self.group["done"].get_orthogonal_selection(np.asarray(indices, dtype=np.int64))
        return [int(index) for index, mark in zip(indices, done) if mark == 0]

    def write_image(
        self,
        index: int,
        image: np.ndarray,
        labels: np.ndarray | None,
        activations: Sequence[torch.Tensor],
    ) -> None:
        """Writes one image's region of every array, then marks it done.

        Args:
            index: the image's position in the store.
            image: uint8 (S, S, 3).
            labels: int (S, S), or None when the image has no label map.
            activations: per (step, block) in feature order, float (C_b, h_b, w_b).
        """
        regions = {name: region for name, region in self._feature_regions(activations)}
        regions["labels"] = np.full((self.schema.image_size,) * 2, NO_LABELS, np.int16) if labels is None else labels.astype(np.int16)
        regions["images"] = np.asarray(image, dtype=np.uint8)
        for name, region in regions.items():
            self.group[name][index] = region
        # The checksum and the done mark come last: a killed write leaves the image pending.
        self.group["checksums"][index] = image_digest(list(regions.values()))
        self.group["done"][index] = 1

    def _feature_regions(self, activations: Sequence[torch.Tensor]):
        """(array name, float16 region) pairs of one image's features."""
        if self.schema.layout == "dense":
            size = self.schema.image_size
            pixels = upsample_and_concatenate([table[None] for table in activations], size)[0]  # (S, S, D)
            yield "pixels", pixels.to(torch.float16).numpy()
            return
        num_blocks = len(self.schema.block_shapes)
        for position, shape in enumerate(self.schema.block_shapes):
            per_step = activations[position::num_blocks]  # this block at every step, in step order
            yield f"block_{shape.block}", torch.stack([table.to(torch.float16) for table in per_step]).numpy()  # (T, C, h, w)


def open_store_for_writing(
    path: str | Path, schema: StoreSchema, codec: str = "blosc-lz4", replace_mismatched: bool = False
) -> FeatureStoreWriter:
    """Creates a store from its schema, or reopens one with the same schema to resume it.

    Args:
        path: the store directory, or a URL fsspec reaches (s3://…, gs://…, memory://…).
        schema: what the store must hold.
        codec: compression for new arrays ("blosc-lz4", "zstd", "none").
        replace_mismatched: delete an existing store whose schema differs instead of refusing.

    Raises:
        StoreMismatchError: when `path` holds another store (or other files) and
            `replace_mismatched` is False.
    """
    path = store_location(path)
    if location_exists(path):
        try:
            stored = _read_schema(path) if holds_zarr_group(path) else None
        except StoreFormatError:
            if not replace_mismatched:
                raise
            stored = None
        if stored == schema:
            return FeatureStoreWriter(open_zarr_group(path, "r+"), schema, path)
        if not replace_mismatched:
            reason = (
                f"it holds other features (differs in: {', '.join(_schema_differences(stored, schema))})"
                if stored is not None
                else "it exists and is not a segcache store"
            )
            raise StoreMismatchError(
                f"refusing to write into {path}: {reason}. Choose another --store path or delete it."
            )
        logger.warning("replacing %s: its contents do not match the requested extraction", path)
        remove_location(path)
    return FeatureStoreWriter(_create_store(path, schema, codec), schema, path)


def _create_store(path: Location, schema: StoreSchema, codec: str) -> zarr.Group:
    import pipeline

    group = open_zarr_group(path, "w", zarr_format=3)
    size, count = schema.image_size, len(schema.image_names)
    compressors, small = _compressors(codec), _compressors("zstd")
    group.create_array(
        "images", shape=(count, size, size, 3), chunks=(1, size, size, 3), dtype="uint8", compressors=small,
        dimension_names=("image", "y", "x", "rgb"),
    )
    group.create_array(
        "labels", shape=(count, size, size), chunks=(1, size, size), dtype="int16", fill_value=NO_LABELS,
        compressors=small, dimension_names=("image", "y", "x"),
    )
    group.create_array(
        "checksums", shape=(count, 32), chunks=(1, 32), dtype="uint8", compressors=small,
        dimension_names=("image", "sha256_byte"),
    )
    group.create_array(
        "done", shape=(count,), chunks=(1,), dtype="uint8", fill_value=0, compressors=small,
        dimension_names=("image",),
    )
    if schema.layout == "native":
        for shape in schema.block_shapes:
            group.create_array(
                f"block_{shape.block}",
                shape=(count, len(schema.steps), shape.channels, shape.height, shape.width),
                chunks=(1, len(schema.steps), shape.channels, shape.height, shape.width),
                dtype="float16",
                compressors=compressors,
                # Named dimensions let xarray open the store; each block has its own sizes.
                dimension_names=("image", "step", f"channel_{shape.block}", f"y_{shape.block}", f"x_{shape.block}"),
            )
    elif schema.layout == "dense":
        tile = min(DENSE_TILE, size)
        group.create_array(
            "pixels",
            shape=(count, size, size, schema.feature_dim),
            chunks=(1, tile, tile, schema.feature_dim),
            dtype="float16",
            compressors=compressors,
            dimension_names=("image", "y", "x", "feature"),
        )
    else:
        raise ValueError(f"unknown layout {schema.layout!r}; use native or dense")
    group.attrs["segcache"] = {**schema.to_json(), "code_version": pipeline.__version__}
    return group


def _read_schema(path: Location) -> StoreSchema:
    group = open_zarr_group(path, "r")
    document = group.attrs.get("segcache")
    if document is None:
        raise ValueError(f"{path} is a Zarr group but not a segcache feature store (no 'segcache' attribute)")
    if document.get("format") != FORMAT_VERSION:
        raise StoreFormatError(
            f"{path} was written in store format {document.get('format')}; this version of segcache reads and "
            f"writes format {FORMAT_VERSION}. Re-run extract into a new store (or let the DVC stage replace it)."
        )
    return StoreSchema.from_json(document)


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

    A pickled store is its location and cache size: unpickled (on a Dask worker), it reopens
    the store there with an empty cache of its own.
    """

    def __init__(self, path: str | Path, cache_megabytes: int = 512):
        self.path = store_location(path)
        self.cache_megabytes = cache_megabytes
        if not holds_zarr_group(self.path):
            raise FileNotFoundError(f"no feature store at {self.path} (run `extract` first)")
        self.group = open_zarr_group(self.path, "r")
        self.schema = _read_schema(self.path)
        self.code_version = self.group.attrs["segcache"].get("code_version")
        self._cache = _TableCache(cache_megabytes << 20)

    def __getstate__(self) -> dict:
        return {"path": self.path, "cache_megabytes": self.cache_megabytes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["cache_megabytes"])

    # --- what the store holds -------------------------------------------------------------
    @property
    def layout(self) -> str:
        return self.schema.layout

    @property
    def image_size(self) -> int:
        return self.schema.image_size

    @property
    def num_images(self) -> int:
        return len(self.schema.image_names)

    @property
    def image_names(self) -> list[str]:
        return list(self.schema.image_names)

    @property
    def feature_dim(self) -> int:
        return self.schema.feature_dim

    def require(
        self,
        steps: Sequence[int] | None = None,
        blocks: Sequence[int] | None = None,
        checkpoint_sha256: str | None = None,
    ) -> None:
        """Refuses (StoreMismatchError) when the store holds other steps, blocks or model."""
        problems = []
        if steps is not None and list(steps) != self.schema.steps:
            problems.append(f"steps {self.schema.steps}, not {list(steps)}")
        if blocks is not None and list(blocks) != self.schema.blocks:
            problems.append(f"blocks {self.schema.blocks}, not {list(blocks)}")
        if checkpoint_sha256 is not None and checkpoint_sha256 != self.schema.checkpoint_sha256:
            problems.append(
                f"features of checkpoint {self.schema.checkpoint_sha256[:12]}…, not {checkpoint_sha256[:12]}…"
            )
        if problems:
            raise StoreMismatchError(f"store {self.path} holds {'; '.join(problems)}")

    def feature_description(self) -> dict:
        """What a model trained on these features must record to be applied to others."""
        schema = self.schema
        return {
            "steps": schema.steps,
            "blocks": schema.blocks,
            "checkpoint_sha256": schema.checkpoint_sha256,
            "image_size": schema.image_size,
            "noise_seed": schema.noise_seed,
            "feature_dim": schema.feature_dim,
        }

    def done_mask(self) -> np.ndarray:
        """bool (N,): which images are completely written."""
        return self.group["done"][:] == 1

    def _check_done(self, index: int) -> None:
        if not 0 <= index < self.num_images:
            raise IndexError(f"image index {index} outside 0..{self.num_images - 1} in {self.path}")
        if self.group["done"][index] != 1:
            raise IncompleteImageError(
                f"image {index} ({self.schema.image_names[index]}) in {self.path} was not completely "
                "written; re-run extract to finish the store"
            )

    def _read(self, array_name: str, index: int, *selection) -> np.ndarray:
        """Reads (part of) one image's region; a chunk failing its CRC32C is a DamagedImageError."""
        try:
            return self.group[array_name][(index, *selection)]
        except (ValueError, RuntimeError) as error:
            raise DamagedImageError(
                f"image {index} ({self.schema.image_names[index]}) in {self.path}: `{array_name}` cannot be read "
                f"back ({error}); delete its done mark or the store and re-run extract"
            ) from None

    def _feature_array_names(self) -> list[str]:
        if self.layout == "dense":
            return ["pixels"]
        return [f"block_{block}" for block in self.schema.blocks]

    def verify_image(self, index: int) -> bool:
        """Whether an image's stored bytes still match the checksum recorded when it was written."""
        self._check_done(index)
        try:
            regions = [self._read(name, index) for name in [*self._feature_array_names(), "labels", "images"]]
        except DamagedImageError:
            return False
        return bool(np.array_equal(image_digest(regions), self.group["checksums"][index]))

    def damaged_images(self) -> list[str]:
        """Names of the finished images whose bytes no longer match their checksums."""
        return [self.schema.image_names[i] for i in np.flatnonzero(self.done_mask()) if not self.verify_image(int(i))]

    # --- per image --------------------------------------------------------------------------
    def image(self, index: int) -> np.ndarray:
        """The resized input image, uint8 (S, S, 3)."""
        self._check_done(index)
        return self._read("images", index)

    def labels(self, index: int) -> np.ndarray | None:
        """The image's label map, int64 (S, S), or None when it has none."""
        self._check_done(index)
        labels = self._read("labels", index).astype(np.int64)
        return None if (labels == NO_LABELS).all() else labels

    def block_tables(self, index: int) -> list[torch.Tensor]:
        """Native layout: per (step, block) in feature order, float16 (C_b, h_b, w_b)."""
        if self.layout != "native":
            raise ValueError(f"{self.path} has the dense layout; block tables exist only in native stores")
        cached = self._cache.get(index)
        if cached is not None:
            return cached
        self._check_done(index)
        per_block = [torch.from_numpy(self._read(name, index)) for name in self._feature_array_names()]
        tables = [per_block[b][s] for s in range(len(self.schema.steps)) for b in range(len(per_block))]
        self._cache.put(index, tables)
        return tables

    def pixel_features(self, index: int, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Feature vectors of chosen pixels of one image, float32 (P, D)."""
        ys, xs = np.asarray(ys, dtype=np.int64), np.asarray(xs, dtype=np.int64)
        if self.layout == "native":
            return gather_pixels_from_blocks(self.block_tables(index), ys, xs, self.image_size)
        self._check_done(index)
        return self._dense_pixels(index, ys, xs)

    def _dense_pixels(self, index: int, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Reads whole tiles (chunks) and picks the pixels from them; never one pixel at a time."""
        pixels = self.group["pixels"]
        tile = pixels.chunks[1]
        features = np.empty((len(ys), self.feature_dim), dtype=np.float32)
        tile_ids = (ys // tile) * (self.image_size // tile + 1) + xs // tile
        for tile_id in np.unique(tile_ids):
            members = np.flatnonzero(tile_ids == tile_id)
            top, left = ys[members[0]] // tile * tile, xs[members[0]] // tile * tile
            block = self._read("pixels", index, slice(top, top + tile), slice(left, left + tile))  # (tile, tile, D)
            features[members] = block[ys[members] - top, xs[members] - left]
        return features

    def image_features(self, index: int) -> np.ndarray:
        """All pixel features of one image, float16 (S, S, D)."""
        if self.layout == "dense":
            self._check_done(index)
            return self._read("pixels", index)
        tables = self.block_tables(index)
        pixels = upsample_and_concatenate([table[None] for table in tables], self.image_size)[0]
        return pixels.to(torch.float16).numpy()

    # --- everything, lazily -----------------------------------------------------------------
    def to_dask(self) -> dask.array.Array:
        """A lazy float16 (N, S, S, D) Dask array of every pixel feature (one chunk per image
        for native stores, the store's tiles for dense ones)."""
        if self.layout == "dense":
            return dask.array.from_zarr(self.group["pixels"])
        size = self.image_size
        per_image = [
            dask.array.from_delayed(
                dask.delayed(self.image_features)(index), shape=(size, size, self.feature_dim), dtype=np.float16
            )
            for index in range(self.num_images)
        ]
        return dask.array.stack(per_image)

    def disk_bytes(self) -> int:
        """Bytes the store takes on disk (or in object storage)."""
        return location_bytes(self.path)
