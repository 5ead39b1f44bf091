"""Extracting the raw-pixel baseline into an ordinary feature store."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pipeline.data.folders import (
    ClassInfo,
    check_examples,
    check_labels_complete,
    file_sha256,
    list_images,
    load_example,
    model_input_to_uint8,
)
from pipeline.sources.pixels import PIXEL_BLOCK, neighbourhood_features
from pipeline.store.schema import BlockShape, StoreSchema
from pipeline.store.writer import ExtractionSummary, open_store_for_writing

logger = logging.getLogger(__name__)


def extract_pixel_features(
    images_dir: str | Path,
    store_path: str | Path,
    size: int,
    neighbourhood: int = 3,
    classes: ClassInfo | None = None,
    replace_mismatched: bool = False,
    show_progress: bool = True,
) -> ExtractionSummary:
    """Writes the raw-pixel baseline features of a folder of images into a store."""
    started = time.perf_counter()
    records = list_images(images_dir)
    check_labels_complete(records, images_dir)
    check_examples(records, classes)
    channels = 3 * neighbourhood**2
    schema = StoreSchema(
        layout="native",
        image_size=size,
        steps=[0],
        block_shapes=[BlockShape(PIXEL_BLOCK, channels, size, size)],
        checkpoint_sha256=f"raw-pixels-{neighbourhood}x{neighbourhood}",
        architecture={"kind": "raw pixels", "neighbourhood": neighbourhood},
        noise_seed=0,
        image_names=[record.name for record in records],
        image_sha256=[file_sha256(record.image_path) for record in records],
        classes=None if classes is None else {"names": classes.names, "ignore_label": classes.ignore_label},
    )
    writer = open_store_for_writing(store_path, schema, replace_mismatched=replace_mismatched)
    pending = writer.pending_images()
    for index in tqdm(pending, desc="pixels", unit="image", disable=not show_progress):
        image, labels = load_example(records[index], size, classes)  # (3, S, S), (S, S) or None
        features = neighbourhood_features(torch.from_numpy(image), neighbourhood)
        writer.write_image(index, model_input_to_uint8(image), labels, [features])
    return ExtractionSummary(
        store_path=Path(store_path),
        images_total=len(records),
        images_written=len(pending),
        feature_dim=channels,
        seconds=time.perf_counter() - started,
        device="cpu",
    )

