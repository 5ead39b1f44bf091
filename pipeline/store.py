"""The feature store: a Zarr v3 group of float16 diffusion features, one region per image.

Layout of a store (all chunks hold exactly one image, so images are written independently):

    attrs["segcache"]         schema and provenance (see `StoreSchema`)
    images   (N, S, S, 3)     uint8, the resized input images
    labels   (N, S, S)        int16, label maps; -1 where an image has no labels
    checksums (N, 32)         uint8, sha256 of each image's regions, recorded when written
    done     (N,)             uint8, 1 once every array of that image is written
    .claims/<i>               empty lock files: a writer holds `flock` on image i while writing it
    native layout:  block_<b> (N, T, C_b, h_b, w_b) float16 — each block at its own resolution,
                    T steps in feature order
    dense layout:   pixels    (N, S, S, D) float16 — upsampled pixel features, chunked in tiles

Pixel features are in the paper's order: step-major, then blocks in the given order. A native
store makes any pixel's D-dimensional vector on demand (`pipeline.features`); a dense store
holds them written out. Both are read through `FeatureStore`.

Safety of writing (what a kill, a full disk or a second writer can and cannot do):
- A store is built beside its path and renamed into place: it exists whole or not at all.
- Each image is one region of every array (chunks never span images). Its chunks are written
  first (zarr writes each chunk to a temporary file and renames it), then its checksum, then its
  done mark: an image killed halfway stays pending and is rewritten on the next run.
- A writer holds an exclusive `flock` on `.claims/<i>` while it computes and writes image i,
  and re-checks the done mark once it holds it: two processes on one store share the work
  instead of writing the same image twice. The kernel drops the lock when a process dies.
- Readers see only done images; every chunk carries a CRC32C, every image a sha256, and a chunk
  missing from a done image is damage, not zeros.
- A store is only ever read as Zarr v3 with the dtypes, shapes and codecs segcache writes:
  nothing in it is unpickled or decoded by a codec segcache did not choose.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import itertools
import logging
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import dask
import dask.array
import numpy as np
import torch
import zarr
import zarr.codecs
from zarr.core.sync import sync

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
from pipeline.pause_points import pause_point

logger = logging.getLogger(__name__)

FORMAT_VERSION = 3  # 3: every chunk of a done image is on disk, so a missing chunk is damage
READABLE_FORMATS = (2, 3)  # 2: per-image checksums and CRC32C chunks (empty chunks may be absent)
CLAIMS_DIR = ".claims"
# The only codecs a store may use: segcache's own choices (`_compressors`), nothing that unpickles.
ALLOWED_CODECS = frozenset({"bytes", "blosc", "zstd", "crc32c"})
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
        """Raises TypeError, KeyError or ValueError on a malformed document."""
        fields = {key: value for key, value in document.items() if key not in ("format", "code_version")}
        fields["block_shapes"] = [BlockShape(**shape) for shape in fields["block_shapes"]]
        return cls(**fields)

    def array_layouts(self) -> dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]]:
        """Every array of a store with this schema: name → (dtype, shape, chunk shape)."""
        count, size = len(self.image_names), self.image_size
        arrays = {
            "images": ("uint8", (count, size, size, 3), (1, size, size, 3)),
            "labels": ("int16", (count, size, size), (1, size, size)),
            "checksums": ("uint8", (count, 32), (1, 32)),
            "done": ("uint8", (count,), (1,)),
        }
        if self.layout == "dense":
            tile = min(DENSE_TILE, size)
            arrays["pixels"] = ("float16", (count, size, size, self.feature_dim), (1, tile, tile, self.feature_dim))
        for shape in self.block_shapes if self.layout == "native" else []:
            dims = (len(self.steps), shape.channels, shape.height, shape.width)
            arrays[f"block_{shape.block}"] = ("float16", (count, *dims), (1, *dims))
        return arrays

    def dimension_names(self) -> dict[str, tuple[str, ...]]:
        """Every array's named dimensions (what lets xarray open a store); blocks have their own sizes."""
        names = {
            "images": ("image", "y", "x", "rgb"),
            "labels": ("image", "y", "x"),
            "checksums": ("image", "sha256_byte"),
            "done": ("image",),
            "pixels": ("image", "y", "x", "feature"),
        }
        for shape in self.block_shapes:
            block = shape.block
            names[f"block_{block}"] = ("image", "step", f"channel_{block}", f"y_{block}", f"x_{block}")
        return names


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


def _is_store(path: Path) -> bool:
    return (path / "zarr.json").is_file()


def _is_absent_or_empty(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def _done_marks(group: zarr.Group, count: int) -> np.ndarray:
    """bool (N,): which images carry a done mark. An unreadable mark counts as not done."""
    try:
        return group["done"][:] == 1
    except (ValueError, RuntimeError):  # a damaged chunk of `done`: read the marks one by one
        marks = np.zeros(count, dtype=bool)
        for index in range(count):
            with contextlib.suppress(ValueError, RuntimeError):
                marks[index] = group["done"][index] == 1
        return marks


@dataclasses.dataclass(frozen=True)
class ExtractionSummary:
    """What an extraction into a store did (the UNet's features or the raw-pixel baseline)."""

    store_path: Location
    images_total: int
    images_written: int  # by this run (not by another process working on the same store)
    feature_dim: int
    seconds: float
    device: str


class FeatureStoreWriter:
    """Writes images into a store created from its full schema up front.

    Args:
        group: the store's Zarr group, opened for writing.
        schema: what it holds.
        location: where it is (a local folder or a URL). Only a local folder has per-image
            claims; elsewhere (None, or a URL) the caller makes sure no two writers write the
            same image, as the Dask extraction does by giving each batch its own images.
    """

    def __init__(self, group: zarr.Group, schema: StoreSchema, location: Location | None = None):
        self.group = group
        self.schema = schema
        self.location = location
        self.path = location if isinstance(location, Path) else None  # claims and leftovers

    def pending_images(self) -> list[int]:
        """Indices of images not yet completely written."""
        done = _done_marks(self.group, len(self.schema.image_names))
        return [int(index) for index in np.flatnonzero(~done)]

    @contextlib.contextmanager
    def claim(self, indices: Sequence[int], wait: bool = False) -> Iterator[list[int]]:
        """Holds the images of `indices` that are still pending, for this writer alone.

        Yields the claimed indices, in order: not those another writer holds (unless `wait`,
        which waits for it to finish or die) and not those done by the time the claim is held.
        A claim is an exclusive `flock` on `.claims/<index>`, released when the block ends or
        the process dies (the kernel drops it, so a killed writer never leaves an image locked).
        """
        if self.path is None:
            yield self.pending_among(indices)
            return
        claims_dir = self.path / CLAIMS_DIR
        claims_dir.mkdir(exist_ok=True)
        held: dict[int, int] = {}  # index → file descriptor of its lock
        try:
            for index in indices:
                descriptor = os.open(claims_dir / str(index), os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
                except BlockingIOError:
                    os.close(descriptor)
                    continue
                held[index] = descriptor
                if self._is_done(index):
                    os.close(held.pop(index))  # another writer finished it meanwhile
            yield list(held)
        finally:
            for descriptor in held.values():
                os.close(descriptor)

    def _is_done(self, index: int) -> bool:
        try:
            return bool(self.group["done"][index] == 1)
        except (ValueError, RuntimeError):  # an unreadable mark: not done
            return False

    def pending_among(self, indices: Sequence[int]) -> list[int]:
        """Those of `indices` not yet completely written (reads only their done marks; an
        unreadable mark counts as not done)."""
        return [int(index) for index in indices if not self._is_done(index)]

    def write_image(
        self,
        index: int,
        image: np.ndarray,
        labels: np.ndarray | None,
        activations: Sequence[torch.Tensor],
    ) -> None:
        """Writes one image's region of every array, then its checksum, then marks it done.

        Args:
            index: the image's position in the store.
            image: uint8 (S, S, 3).
            labels: int (S, S), or None when the image has no label map.
            activations: per (step, block) in feature order, float (C_b, h_b, w_b).
        """
        regions = {name: region for name, region in self._feature_regions(activations)}
        regions["labels"] = np.full((self.schema.image_size,) * 2, NO_LABELS, np.int16) if labels is None else labels.astype(np.int16)
        regions["images"] = np.asarray(image, dtype=np.uint8)
        pause_point("write-image-begin", index)
        self._remove_partial_chunks(index)
        for position, (name, region) in enumerate(regions.items()):
            # Every chunk is written, even one equal to the fill value: a missing chunk is damage.
            self.group[name].with_config({"write_empty_chunks": True})[index] = region
            if position == 0:
                pause_point("write-image-features-written", index)
        # The checksum and the done mark come last: a killed write leaves the image pending.
        self.group["checksums"][index] = image_digest(list(regions.values()))
        self.group["done"][index] = 1
        pause_point("write-image-done", index)

    def _remove_partial_chunks(self, index: int) -> None:
        """Deletes what a writer killed during one of this image's chunk writes left behind:
        zarr's temporary `<chunk>.<uuid>.partial` files (the chunk itself is old or absent)."""
        if self.path is None:
            return
        for name in self.schema.array_layouts():
            chunks = self.path / name / "c"
            for leftover in [*chunks.glob(f"{index}.*.partial"), *(chunks / str(index)).rglob("*.partial")]:
                leftover.unlink(missing_ok=True)

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

    Safe to call from several processes at once: the store is created once, atomically.

    Args:
        path: the store directory, or a URL fsspec reaches (s3://…, gs://…, memory://…).
        schema: what the store must hold.
        codec: compression for new arrays ("blosc-lz4", "zstd", "none").
        replace_mismatched: delete an existing segcache store whose schema differs instead of
            refusing. A folder that is not a segcache store is never deleted.

    Raises:
        StoreMismatchError: when `path` holds another store and `replace_mismatched` is False,
            or holds files that are not a segcache store.
        StoreFormatError: when `path` holds a store in another format (or with foreign arrays)
            and `replace_mismatched` is False.
    """
    location = store_location(path)
    if not isinstance(location, Path):
        return _open_remote_store_for_writing(location, schema, codec, replace_mismatched)
    path = location
    if _is_absent_or_empty(path):
        _create_store_atomically(path, schema, codec)
    stored = _existing_schema(path, replace_mismatched)
    if stored != schema and replace_mismatched:
        logger.warning("replacing %s: its contents do not match the requested extraction", path)
        _remove_store(path)
        _create_store_atomically(path, schema, codec)
        stored = _existing_schema(path, replace_mismatched=False)
    if stored != schema:
        raise StoreMismatchError(
            f"refusing to write into {path}: it holds other features (differs in: "
            f"{', '.join(_schema_differences(stored, schema))}). Choose another --store path or delete it."
        )
    group = zarr.open_group(path, mode="r+", zarr_format=3)
    _check_arrays(group, schema, path)
    return FeatureStoreWriter(group, schema, path)


def _open_remote_store_for_writing(
    url: str, schema: StoreSchema, codec: str, replace_mismatched: bool
) -> FeatureStoreWriter:
    """`open_store_for_writing` at a URL. Object stores cannot rename, so the store is created
    in place; create it once (from the driver) before writers of disjoint images start."""
    if location_exists(url):
        if not holds_zarr_group(url) or "segcache" not in open_zarr_group(url, "r", zarr_format=3).attrs:
            raise StoreMismatchError(
                f"refusing to write into {url}: it exists and is not a segcache store (it is never deleted "
                "or overwritten). Choose another --store URL, or move it away."
            )
        try:
            stored = _read_schema(url)
        except StoreFormatError:
            if not replace_mismatched:
                raise
            stored = None
        if stored == schema:
            group = open_zarr_group(url, "r+", zarr_format=3)
            _check_arrays(group, schema, url)
            return FeatureStoreWriter(group, schema, url)
        if not replace_mismatched:
            raise StoreMismatchError(
                f"refusing to write into {url}: it holds other features (differs in: "
                f"{', '.join(_schema_differences(stored, schema))}). Choose another --store path or delete it."
            )
        logger.warning("replacing %s: its contents do not match the requested extraction", url)
        remove_location(url)
    return FeatureStoreWriter(_create_store(url, schema, codec), schema, url)


def _existing_schema(path: Path, replace_mismatched: bool) -> StoreSchema | None:
    """The schema of the segcache store at `path`; None for one that cannot be read but may be
    replaced. Files that are not a segcache store are refused whatever `replace_mismatched` says."""
    if not _is_store(path) or "segcache" not in zarr.open_group(path, mode="r", zarr_format=3).attrs:
        raise StoreMismatchError(
            f"refusing to write into {path}: it exists and is not a segcache store (it is never deleted "
            "or overwritten). Choose another --store path, or move it away."
        )
    try:
        return _read_schema(path)
    except StoreFormatError:
        if not replace_mismatched:
            raise
        return None


def _create_store_atomically(path: Path, schema: StoreSchema, codec: str) -> None:
    """Builds the store beside `path`, then renames it into place: a kill leaves no half-made
    store, and of two writers creating it at once one wins and the other finds its store."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.creating-", dir=path.parent))
    try:
        _create_store(staging, schema, codec)
        os.rename(staging, path)  # replaces an empty folder; fails on a non-empty one
    except OSError as error:
        if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        logger.info("%s was created by another writer meanwhile", path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remove_store(path: Path) -> None:
    """Renames the store aside (one atomic step: readers and writers never see half of it), then deletes it."""
    retired = path.with_name(f".{path.name}.replaced-{uuid.uuid4().hex}")
    with contextlib.suppress(FileNotFoundError):  # another writer replaced it first
        os.rename(path, retired)
    shutil.rmtree(retired, ignore_errors=True)


def _create_store(path: Location, schema: StoreSchema, codec: str) -> zarr.Group:
    import pipeline

    if schema.layout not in ("native", "dense"):
        raise ValueError(f"unknown layout {schema.layout!r}; use native or dense")
    group = open_zarr_group(path, "w", zarr_format=3)
    features, small = _compressors(codec), _compressors("zstd")
    dimension_names = schema.dimension_names()
    for name, (dtype, shape, chunks) in schema.array_layouts().items():
        group.create_array(
            name, shape=shape, chunks=chunks, dtype=dtype, fill_value=NO_LABELS if name == "labels" else 0,
            compressors=features if dtype == "float16" else small, dimension_names=dimension_names[name],
        )
    group.attrs["segcache"] = {**schema.to_json(), "code_version": pipeline.__version__}
    return group


def _read_schema(path: Location) -> StoreSchema:
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


def _check_arrays(group: zarr.Group, schema: StoreSchema, path: Path) -> None:
    """Refuses a store whose arrays are not exactly those segcache writes for this schema: other
    dtypes, shapes or chunks, or a codec outside `ALLOWED_CODECS` (nothing gets decoded by a codec
    a store's author chose, e.g. one that unpickles)."""
    for name, (dtype, shape, chunks) in schema.array_layouts().items():
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
        _check_arrays(self.group, self.schema, self.path)
        self.format = self.group.attrs["segcache"]["format"]
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
        return _done_marks(self.group, self.num_images)

    def _check_done(self, index: int) -> None:
        if not 0 <= index < self.num_images:
            raise IndexError(f"image index {index} outside 0..{self.num_images - 1} in {self.path}")
        if not self._read("done", index) == 1:
            raise IncompleteImageError(
                f"image {index} ({self.schema.image_names[index]}) in {self.path} was not completely "
                "written; re-run extract to finish the store"
            )

    def _read(self, array_name: str, index: int, *selection: slice) -> np.ndarray:
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
        if self.format < 3:
            return []  # format 2 skipped chunks equal to the fill value: absence means nothing
        ranges = [range(index, index + 1)]
        for axis, (length, chunk) in enumerate(zip(array.shape[1:], array.chunks[1:])):
            part = selection[axis] if axis < len(selection) else slice(0, length)
            ranges.append(range(part.start // chunk, -(-part.stop // chunk)))
        keys = [f"{array.path}/{array.metadata.encode_chunk_key(coords)}" for coords in itertools.product(*ranges)]
        return [key for key in keys if not sync(array.store.exists(key))]

    def _feature_array_names(self) -> list[str]:
        if self.layout == "dense":
            return ["pixels"]
        return [f"block_{block}" for block in self.schema.blocks]

    def verify_image(self, index: int) -> bool:
        """Whether an image's stored bytes still match the checksum recorded when it was written."""
        self._check_done(index)
        try:
            regions = [self._read(name, index) for name in [*self._feature_array_names(), "labels", "images"]]
            recorded = self._read("checksums", index)
        except DamagedImageError:
            return False
        return bool(np.array_equal(image_digest(regions), recorded))

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
