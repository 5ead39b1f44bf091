"""Creating, resuming and writing a feature store: `open_store_for_writing`, `FeatureStoreWriter`."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import zarr
import zarr.codecs
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from pipeline.config import ExtractSettings
from pipeline.runtime.futures import results_in_order
from pipeline.runtime.pause_points import pause_point
from pipeline.store.chunks import (
    AlignedBuffers,
    ChunkEncoder,
    chunk_keys,
    crc_digest,
    image_chunks,
    partial_path,
    read_trailers,
    write_chunk_file,
)
from pipeline.store.layouts import dimension_names, layout_named, store_arrays
from pipeline.store.locations import (
    Location,
    holds_zarr_group,
    location_exists,
    open_zarr_group,
    remove_location,
    store_location,
)
from pipeline.store.reader import check_arrays, done_marks, read_schema
from pipeline.store.schema import (
    NO_LABELS,
    StoreFormatError,
    StoreMismatchError,
    StoreSchema,
    chunk_codecs,
    regions_sha256,
    schema_differences,
)

logger = logging.getLogger(__name__)


def claims_folder(store: Path) -> Path:
    """Where writers of a local store hold their per-image locks: `.<store name>.claims/` beside
    it, so the store holds nothing but Zarr (plain zarr and xarray open it without a warning)."""
    return store.with_name(f".{store.name}.claims")


def _is_store(path: Path) -> bool:
    return (path / "zarr.json").is_file()


def _is_absent_or_empty(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


@dataclasses.dataclass(frozen=True)
class ExtractionSummary:
    """What an extraction into a store did (the UNet's features or the raw-pixel baseline)."""

    store_path: Location
    images_total: int
    images_written: int  # by this run (not by another process working on the same store)
    feature_dim: int
    seconds: float
    device: str
    image_shape: tuple[int, int]  # (H, W) of the store's images
    images_of_other_shapes: int  # images of another aspect ratio, resized to the store's all the same


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
        self.path = location if isinstance(location, Path) else None  # claims, leftovers, direct chunk files
        # A store of format 4 is resumed as it began: its checksums are sha256 of the regions.
        self.format = group.attrs["segcache"]["format"]
        self._encoders = {name: ChunkEncoder(group[name]) for name in store_arrays(schema)}
        self._done = group["done"]  # opened once: its metadata never changes
        self._buffers = AlignedBuffers()  # direct I/O's staging buffers, reused from image to image

    def pending_images(self) -> list[int]:
        """Indices of images not yet completely written."""
        done = done_marks(self.group, len(self.schema.image_names))
        return [int(index) for index in np.flatnonzero(~done)]

    @contextlib.contextmanager
    def claim(self, indices: Sequence[int], wait: bool = False) -> Iterator[list[int]]:
        """Holds the images of `indices` that are still pending, for this writer alone.

        Yields the claimed indices, in order: not those another writer holds (unless `wait`,
        which waits for it to finish or die) and not those done by the time the claim is held.
        A claim is an exclusive `flock` on `<index>` in `claims_folder(store)`, released when the
        block ends or the process dies (the kernel drops it, so a killed writer never leaves an image locked).
        """
        if self.path is None:
            yield self.pending_among(indices)
            return
        claims_dir = claims_folder(self.path)
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
            for index, done in zip(list(held), self._done_among(list(held))):
                if done:  # another writer finished it meanwhile
                    os.close(held.pop(index))
            yield list(held)
        finally:
            for descriptor in held.values():
                os.close(descriptor)

    def pending_among(self, indices: Sequence[int]) -> list[int]:
        """Those of `indices` not yet completely written (reads only their done marks; an
        unreadable mark counts as not done)."""
        return [int(index) for index, done in zip(indices, self._done_among(indices)) if not done]

    def _done_among(self, indices: Sequence[int]) -> list[bool]:
        """Whether each image of `indices` is marked done. A local store's marks are read from
        their files here: through Zarr, whose reads wait on its event loop thread, a batch's marks
        took 20-70 ms beside the writer threads, on the thread that drives the model (0.2-0.6 ms from the files)."""
        if self.path is not None:
            return [self._done_in_file(index) for index in indices]
        if not indices:
            return []
        try:
            marks = self._done.get_orthogonal_selection(np.asarray(indices, dtype=np.int64))  # (len(indices),)
            return [bool(mark == 1) for mark in marks]
        except (ValueError, RuntimeError):  # an unreadable mark among them: each on its own
            return [self._is_done(index) for index in indices]

    def _done_in_file(self, index: int) -> bool:
        (key,) = chunk_keys(self._done, index)
        try:
            marks = self._encoders["done"].decode((self.path / key).read_bytes())
        except (FileNotFoundError, ValueError, RuntimeError):  # never written (the fill value, 0), or undecodable
            return False
        return marks is not None and bool(marks.reshape(-1)[0] == 1)  # None: a damaged mark, not done

    def _is_done(self, index: int) -> bool:
        try:
            return bool(self._done[index] == 1)
        except (ValueError, RuntimeError):  # an unreadable mark: not done
            return False

    def write_image(
        self,
        index: int,
        image: np.ndarray,
        labels: np.ndarray | None,
        feature_maps: Mapping[str, torch.Tensor],
    ) -> None:
        """Writes one image's region of every array, then its checksum, then marks it done.

        Args:
            index: the image's position in the store.
            image: uint8 (H, W, 3).
            labels: int (H, W), or None when the image has no label map.
            feature_maps: tap name → float (T, C, h, w), T maps in step order (`FeatureSource`).
        """
        features = dict(self._feature_regions(feature_maps))  # in the layout's order of arrays, as readers hash them
        labels_region = np.full(self.schema.image_shape, NO_LABELS, np.int16) if labels is None else labels.astype(np.int16)
        others = {"labels": labels_region, "images": np.asarray(image, dtype=np.uint8)}
        pause_point("write-image-begin", index)
        self._remove_partial_chunks(index)
        # Each array's chunks are encoded and written in a thread of their own, all arrays at
        # once: compression, CRC32C, copies and file writes release the GIL, so they share the
        # cores and keep several writes in flight on the disk. Threads started for each image, not
        # kept from one to the next: on the 2-core VM beside busy processes (load 5-6), a kept
        # pool woken for each image wrote 15 % slower (median of 6 side-by-side runs, issue 29).
        regions = {**features, **others}  # in the order the image's checksum takes their trailers
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(regions) + 1) as pool:  # + format 4's sha256
            format_4_checksum = pool.submit(regions_sha256, list(regions.values())) if self.format == 4 else None
            writes = [pool.submit(self._write_chunks, name, index, region) for name, region in regions.items()]
            trailers = dict(zip(regions, results_in_order(writes)))
        pause_point("write-image-features-written", index)  # every chunk written; no checksum, no done mark
        if format_4_checksum is None:
            checksum = crc_digest([trailer for name in regions for trailer in trailers[name]])
        else:
            checksum = format_4_checksum.result()
        # The checksum and the done mark come last: a killed write leaves the image pending.
        self._write_chunks("checksums", index, checksum)
        self._write_chunks("done", index, np.ones((), dtype=np.uint8))
        pause_point("write-image-done", index)

    def replace_labels(self, index: int, labels: np.ndarray | None) -> bool:
        """Gives a finished image a new label map and keeps its features (a person corrected
        its mask: nothing needs computing again). Returns False, and leaves the image pending
        for a full extraction, when its stored chunks no longer match their checksum (a relabel
        must not make damage look intact).

        The order keeps every moment consistent: the image is marked pending first, so a write
        killed midway leaves it to be extracted again, never half relabeled; then its labels,
        its new checksum (format 5: from every chunk's trailer, the features' read, not their
        bytes; format 4: sha256 of the values read back), and the done mark.
        """
        features = list(layout_named(self.schema.layout).feature_arrays(self.schema))
        recorded = self.group["checksums"][index]
        if self.format == 4:
            regions = [self.group[name][index] for name in [*features, "labels", "images"]]
            intact = np.array_equal(regions_sha256(regions), recorded)
        else:
            by_array = {name: read_trailers(self.group[name], index) for name in [*features, "labels", "images"]}
            trailers = [trailer for stored in by_array.values() for trailer in stored]
            intact = None not in trailers and np.array_equal(crc_digest(trailers), recorded)
        self._write_chunks("done", index, np.zeros((), dtype=np.uint8))
        if not intact:
            return False
        labels_region = np.full(self.schema.image_shape, NO_LABELS, np.int16) if labels is None else labels.astype(np.int16)
        new_trailers = self._write_chunks("labels", index, labels_region)
        if self.format == 4:
            checksum = regions_sha256([*regions[:-2], labels_region, regions[-1]])
        else:
            checksum = crc_digest([trailer for name in features for trailer in by_array[name]]
                                  + new_trailers + by_array["images"])
        self._write_chunks("checksums", index, checksum)
        self._write_chunks("done", index, np.ones((), dtype=np.uint8))
        return True

    def _write_chunks(self, name: str, index: int, region: np.ndarray) -> list[bytes]:
        """Writes every chunk of image `index` in array `name`, even one that holds only the fill
        value (a missing chunk is damage); returns their CRC32C trailers, in `chunk_keys` order."""
        encoder = self._encoders[name]
        trailers = []
        for key, chunk in image_chunks(encoder.array, index, region):
            payload, trailer = encoder.encode(chunk)
            if self.path is not None:
                write_chunk_file(self.path / key, payload, trailer, self._buffers)
            else:  # a URL: each object is whole or absent; copying to append the trailer costs little beside the network
                encoded = default_buffer_prototype().buffer.from_bytes(payload.tobytes() + trailer)
                sync(encoder.array.store.set(key, encoded))
            trailers.append(trailer)
        return trailers

    def _remove_partial_chunks(self, index: int) -> None:
        """Deletes what a writer killed during one of this image's chunk writes left behind: the
        chunks' `partial_path` files (the chunk itself is old or absent). By name, so it costs
        the same at the millionth image as at the first."""
        if self.path is None:
            return
        for encoder in self._encoders.values():
            for key in chunk_keys(encoder.array, index):
                partial_path(self.path / key).unlink(missing_ok=True)

    def _feature_regions(self, feature_maps: Mapping[str, torch.Tensor]):
        """(array name, float16 region) pairs of one image's features."""
        missing = [name for name in self.schema.taps if name not in feature_maps]
        if missing:
            raise ValueError(f"no feature maps for the store's taps {missing}")
        yield from layout_named(self.schema.layout).regions(self.schema, feature_maps)


def open_store_for_writing(
    path: str | Path, schema: StoreSchema, codec: str = ExtractSettings.codec, replace_mismatched: bool = False
) -> FeatureStoreWriter:
    """Creates a store from its schema, or reopens one with the same schema to resume it.

    Safe to call from several processes at once: the store is created once, atomically.

    Args:
        path: the store directory, or a URL fsspec reaches (s3://…, gs://…, memory://…).
        schema: what the store must hold.
        codec: compression for new arrays ("blosc-lz4", "zstd", "none"; `ExtractSettings.codec` by default).
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
            f"{', '.join(schema_differences(stored, schema))}). Choose another --store path or delete it."
        )
    group = zarr.open_group(path, mode="r+", zarr_format=3)
    check_arrays(group, schema, path)
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
            stored = read_schema(url)
        except StoreFormatError:
            if not replace_mismatched:
                raise
            stored = None
        if stored == schema:
            group = open_zarr_group(url, "r+", zarr_format=3)
            check_arrays(group, schema, url)
            return FeatureStoreWriter(group, schema, url)
        if not replace_mismatched:
            raise StoreMismatchError(
                f"refusing to write into {url}: it holds other features (differs in: "
                f"{', '.join(schema_differences(stored, schema))}). Choose another --store path or delete it."
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
        return read_schema(path)
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

    layout_named(schema.layout)  # refuses an unknown layout before anything is written
    group = open_zarr_group(path, "w", zarr_format=3)
    features, small = chunk_codecs(codec), chunk_codecs("zstd")
    names = dimension_names(schema)
    for name, (dtype, shape, chunks) in store_arrays(schema).items():
        group.create_array(
            name, shape=shape, chunks=chunks, dtype=dtype, fill_value=NO_LABELS if name == "labels" else 0,
            compressors=features if dtype == "float16" else small, dimension_names=names[name],
        )
    group.attrs["segcache"] = {**schema.to_json(), "code_version": pipeline.__version__}
    return group

