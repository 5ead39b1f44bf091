"""A baseline feature source: each pixel's raw RGB values and those of its neighbours.

Written into an ordinary feature store (one "block" at full resolution, one "step"), so the
same sampler, ensemble and evaluation run on it: the comparison measures the features only.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pipeline.datasets import (
    ClassInfo,
    check_examples,
    check_labels_complete,
    file_sha256,
    list_images,
    load_example,
    model_input_to_uint8,
)
from pipeline.store import BlockShape, ExtractionSummary, StoreSchema, open_store_for_writing

logger = logging.getLogger(__name__)

PIXEL_BLOCK = -1  # the block index recorded for raw pixels (no UNet block)


def neighbourhood_features(image: torch.Tensor, neighbourhood: int) -> torch.Tensor:
    """Stacks every pixel's neighbourhood×neighbourhood RGB values (edges replicated).

    Args:
        image: float (3, S, S) in [-1, 1].
        neighbourhood: odd window width; 1 gives plain RGB.

    Returns:
        float (3 · neighbourhood², S, S).
    """
    if neighbourhood < 1 or neighbourhood % 2 == 0:
        raise ValueError(f"the neighbourhood must be an odd width ≥ 1, got {neighbourhood}")
    radius = neighbourhood // 2
    padded = F.pad(image[None], (radius,) * 4, mode="replicate")  # (1, 3, S + 2r, S + 2r)
    windows = F.unfold(padded, kernel_size=neighbourhood)  # (1, 3·n², S·S)
    size = image.shape[-1]
    return windows.reshape(3 * neighbourhood**2, size, size)


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
