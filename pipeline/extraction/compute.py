"""Extraction's unit of work: one batch of images through the model, into the store.

`extract_batch` is what every runner calls, in this process (`runners.InProcessBatches`) or on a
Dask worker (`dask_runner`); neither is imported here, so there is no cycle.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from pipeline.config import ExtractSettings
from pipeline.data.folders import ClassInfo, ImageRecord, load_example, model_input_to_uint8
from pipeline.sources.diffusion_unet import FeatureExtractor, compute_activations, probe_block_shapes
from pipeline.sources.noise import shared_noise
from pipeline.store.schema import BlockShape
from pipeline.store.writer import FeatureStoreWriter

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ModelDescription:
    """What a store's schema records about the model."""

    block_shapes: list[BlockShape]
    checkpoint_sha256: str
    architecture: dict


def describe_model(extractor: FeatureExtractor, size: int) -> ModelDescription:
    """The chosen blocks' shapes at size×size, the checkpoint's hash and the architecture."""
    return ModelDescription(
        block_shapes=probe_block_shapes(extractor.backbone.unet, extractor.block_modules, size, extractor.device),
        checkpoint_sha256=extractor.backbone.checkpoint_sha256,
        architecture=extractor.backbone.architecture,
    )


def extract_batch(
    extractor: FeatureExtractor,
    writer: FeatureStoreWriter,
    records: Mapping[int, ImageRecord],
    batch: Sequence[int],
    settings: ExtractSettings,
    classes: ClassInfo | None = None,
) -> int:
    """Extracts one batch of images into an open store: the unit of work, in-process and on a cluster.

    Images already marked done are not written again, so a retried batch does no harm. The whole
    batch still goes through the UNet together, so no image's features depend on what was retried.
    Each image is its own region of every array: batches never share a chunk and need no lock.

    Args:
        extractor: the model.
        writer: the store, open for writing.
        records: store index → image (at least those of the batch).
        batch: store indices of the images to extract.
        settings: steps, seed and size.
        classes: to check the label maps against.

    Returns:
        How many images this call wrote.
    """
    pending = set(writer.pending_among(batch))
    if not pending:
        return 0
    examples = [load_example(records[index], settings.size, classes) for index in batch]
    images = np.stack([image for image, _ in examples])  # (B, 3, S, S)
    noise = shared_noise(settings.seed, (1, 3, settings.size, settings.size))
    activations = compute_activations(
        extractor.backbone.unet, extractor.block_modules, torch.from_numpy(images).to(extractor.device),
        settings.steps, noise,
    )
    for position, index in enumerate(batch):
        if index in pending:
            image, labels = model_input_to_uint8(images[position]), examples[position][1]
            writer.write_image(index, image, labels, [activation[position] for activation in activations])
    return len(pending)

