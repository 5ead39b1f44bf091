"""Extraction's unit of work: one batch of images through a feature source, into the store.

`extract_batch` is what every runner calls, in this process (`runners.InProcessBatches`) or on a
Dask worker (`dask_runner`); neither is imported here, so there is no cycle.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from collections.abc import Collection, Mapping, Sequence

import numpy as np
import torch

from pipeline.data.folders import ClassInfo, ImageRecord, load_example, model_input_to_uint8
from pipeline.runtime.futures import results_in_order
from pipeline.sizes import ImageShape
from pipeline.sources.base import FeatureSource, TapShape
from pipeline.store.writer import FeatureStoreWriter

# Images written at once. Two keep the disk busy while one image ends (its largest chunk, its
# checksum and done mark) and the next begins: writing precomputed paper-shape features on the
# 2-core VM, 2 in flight gave 904-1,065 MB/s against 725-830 for 1, in 8 of 8 interleaved pairs
# (issue 29); 3 gave no more. Memory does not grow: the images are those of batches already held.
IMAGES_IN_FLIGHT = 2


@dataclasses.dataclass(frozen=True)
class SourceDescription:
    """What a store's schema records about its feature source."""

    provenance: dict
    steps: list[int]
    tap_shapes: list[TapShape]
    size_multiple: int  # both sides of an input must be multiples of it


def describe_source(source: FeatureSource, shape: ImageShape) -> SourceDescription:
    """The source's provenance, steps and tap shapes for inputs of `shape` (H, W)."""
    return SourceDescription(source.provenance(), list(source.steps), source.tap_shapes(shape), source.size_multiple)


@dataclasses.dataclass
class ComputedBatch:
    """One batch's model outputs on the host, ready to be written (`write_batch`)."""

    indices: list[int]  # store indices of the images to write (the pending ones of the batch)
    images: list[np.ndarray]  # uint8 (H, W, 3) each
    labels: list[np.ndarray | None]
    feature_maps: list[dict[str, torch.Tensor]]  # per image: tap → (T, C, h, w) on the CPU

    def submit_writes(self, writer: FeatureStoreWriter, pool: concurrent.futures.Executor) -> list:
        """Queues each image's `write_image` in `pool`, in order; one `Future` per image."""
        return [pool.submit(writer.write_image, index, image, labels, maps)
                for index, image, labels, maps in zip(self.indices, self.images, self.labels, self.feature_maps)]


def compute_batch(
    source: FeatureSource,
    writer: FeatureStoreWriter,
    records: Mapping[int, ImageRecord],
    batch: Sequence[int],
    shape: ImageShape,
    classes: ClassInfo | None = None,
    pending: Collection[int] | None = None,
) -> ComputedBatch:
    """Runs one batch through the source (the whole batch, so no image's features depend on what
    was retried) and brings the outputs of its pending images to the host: those of `pending`
    where the caller knows them (a claim just read their done marks), else read here.

    On a native store each map is rounded to float16 on the device before the copy (half the
    bytes over the bus; the same values as rounding on the host). A dense store upsamples the
    float32 maps on the host, as before.
    """
    pending = set(writer.pending_among(batch) if pending is None else pending)
    if not pending:
        return ComputedBatch([], [], [], [])
    examples = [load_example(records[index], shape, classes) for index in batch]
    images = np.stack([image for image, _ in examples])  # (B, 3, H, W)
    feature_maps = source.feature_maps(torch.from_numpy(images).to(source.device))  # tap → (B, T, C, h, w)
    dtype = torch.float16 if writer.schema.layout == "native" else torch.float32
    on_host = {name: maps.to(dtype).cpu() for name, maps in feature_maps.items()}
    chosen = [position for position, index in enumerate(batch) if index in pending]
    return ComputedBatch(
        [batch[position] for position in chosen],
        [model_input_to_uint8(images[position]) for position in chosen],
        [examples[position][1] for position in chosen],
        [{name: maps[position] for name, maps in on_host.items()} for position in chosen],
    )


def write_batch(writer: FeatureStoreWriter, computed: ComputedBatch) -> int:
    """Writes a computed batch's images (each its own chunks, checksum and done mark),
    `IMAGES_IN_FLIGHT` at a time; returns how many."""
    with concurrent.futures.ThreadPoolExecutor(IMAGES_IN_FLIGHT, thread_name_prefix="store-writer") as pool:
        return len(results_in_order(computed.submit_writes(writer, pool)))  # a failed write raises


def extract_batch(
    source: FeatureSource,
    writer: FeatureStoreWriter,
    records: Mapping[int, ImageRecord],
    batch: Sequence[int],
    shape: ImageShape,
    classes: ClassInfo | None = None,
) -> int:
    """Extracts one batch of images into an open store: `compute_batch` then `write_batch`, the
    unit of work of a Dask worker.

    Images already marked done are not written again, so a retried batch does no harm. Each
    image is its own region of every array: batches never share a chunk and need no lock.

    Returns:
        How many images this call wrote.
    """
    return write_batch(writer, compute_batch(source, writer, records, batch, shape, classes))
