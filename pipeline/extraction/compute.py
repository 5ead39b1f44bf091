"""Extraction's unit of work: one batch of images through a feature source, into the store.

`extract_batch` is what every runner calls, in this process (`runners.InProcessBatches`) or on a
Dask worker (`dask_runner`); neither is imported here, so there is no cycle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from pipeline.data.folders import ClassInfo, ImageRecord, load_example, model_input_to_uint8
from pipeline.sources.base import FeatureSource, TapShape
from pipeline.store.writer import FeatureStoreWriter


@dataclasses.dataclass(frozen=True)
class SourceDescription:
    """What a store's schema records about its feature source."""

    provenance: dict
    steps: list[int]
    tap_shapes: list[TapShape]


def describe_source(source: FeatureSource, size: int) -> SourceDescription:
    """The source's provenance, steps and tap shapes at size×size."""
    return SourceDescription(source.provenance(), list(source.steps), source.tap_shapes(size))


def extract_batch(
    source: FeatureSource,
    writer: FeatureStoreWriter,
    records: Mapping[int, ImageRecord],
    batch: Sequence[int],
    size: int,
    classes: ClassInfo | None = None,
) -> int:
    """Extracts one batch of images into an open store: the unit of work, in-process and on a cluster.

    Images already marked done are not written again, so a retried batch does no harm. The whole
    batch still goes through the source together, so no image's features depend on what was retried.
    Each image is its own region of every array: batches never share a chunk and need no lock.

    Args:
        source: the model (or raw pixels).
        writer: the store, open for writing.
        records: store index → image (at least those of the batch).
        batch: store indices of the images to extract.
        size: the store's image size.
        classes: to check the label maps against.

    Returns:
        How many images this call wrote.
    """
    pending = set(writer.pending_among(batch))
    if not pending:
        return 0
    examples = [load_example(records[index], size, classes) for index in batch]
    images = np.stack([image for image, _ in examples])  # (B, 3, S, S)
    feature_maps = source.feature_maps(torch.from_numpy(images).to(source.device))  # tap → (B, T, C, h, w)
    for position, index in enumerate(batch):
        if index in pending:
            image, labels = model_input_to_uint8(images[position]), examples[position][1]
            writer.write_image(index, image, labels, {name: maps[position] for name, maps in feature_maps.items()})
    return len(pending)
