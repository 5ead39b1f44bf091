"""The extract stage: images → noised copies → UNet decoder activations → feature store.

The compute is in `compute.py`; here: checking the images, creating or resuming the store, and
running the batches where a `runners.BatchRunner` says (this process or a Dask cluster).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pipeline import sizes
from pipeline.config import ExtractSettings
from pipeline.data.coco import coco_class_info, read_coco, records_with_coco_labels
from pipeline.data.folders import (
    ClassInfo,
    ImageRecord,
    check_examples,
    check_labels_complete,
    list_images,
    load_label_map,
)
from pipeline.extraction.runners import BatchRunner, batch_runner
from pipeline.runtime.hashing import file_sha256
from pipeline.sizes import ImageShape
from pipeline.store.locations import store_location
from pipeline.store.schema import NO_LABELS, StoreSchema
from pipeline.store.writer import ExtractionSummary, FeatureStoreWriter, open_store_for_writing

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _disk_full_explained(store_path: str | Path, writer: FeatureStoreWriter | None) -> Iterator[None]:
    """Turns "no space left on device" into a message that says what is safe and what to do."""
    try:
        yield
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        if writer is None:
            state = "no store was created"
        else:
            total = len(writer.schema.image_names)
            state = (
                f"the {total - len(writer.pending_images())} of {total} images finished so far are complete and "
                "checksummed"
            )
        raise OSError(
            error.errno,
            f"disk full while writing the feature store {store_path} ({error.strerror}): {state}; free some space "
            "and re-run extract to finish",
        ) from error


def extract_features(
    checkpoint: str | Path,
    images_dir: str | Path,
    store_path: str | Path,
    settings: ExtractSettings,
    classes: ClassInfo | None = None,
    replace_mismatched: bool = False,
    show_progress: bool = True,
    code_sha256: str | None = None,
    coco: str | Path | None = None,
) -> ExtractionSummary:
    """Extracts every image's features of a folder into a store, resuming unfinished work.

    With `settings.scheduler` set, the batches run as tasks on that Dask cluster (each worker
    loads the model once and writes its images straight into the store); without, in this process.

    Args:
        checkpoint: guided-diffusion or diffusers checkpoint.
        images_dir: folder of PNG/JPEG images with optional same-stem `.npy` label maps.
        store_path: the store to create or complete: a folder or a URL (s3://…, gs://…).
        settings: steps, blocks, seed, size, layout, batch size, device, codec, scheduler.
        classes: class names and ignore label, recorded in the store.
        replace_mismatched: replace a store that holds other features instead of refusing.
        show_progress: show a progress bar.
        code_sha256: recorded in the schema: a store written by other code is another store.
        coco: a COCO JSON file whose masks are the label maps of the images it lists
            (`pipeline.data.coco`; classes matched by name; without `classes`, its categories).
            A finished image whose label map changed is relabeled, its features kept.
    """
    return extract_with_runner(
        lambda: batch_runner(checkpoint, settings), images_dir, store_path, settings.size, settings.layout,
        settings.codec, settings.batch_size, classes, replace_mismatched, show_progress, code_sha256, settings.resize,
        coco,
    )


def extract_with_runner(
    open_runner: Callable[[], AbstractContextManager[BatchRunner]],
    images_dir: str | Path,
    store_path: str | Path,
    size: int | list[int],
    layout: str = "native",
    codec: str = ExtractSettings.codec,
    batch_size: int = 4,
    classes: ClassInfo | None = None,
    replace_mismatched: bool = False,
    show_progress: bool = True,
    code_sha256: str | None = None,
    resize: str | None = None,
    coco: str | Path | None = None,
) -> ExtractionSummary:
    """Extracts a folder into a store through any runner (any feature source): `extract_features`
    for diffusion UNets, `pixels.extract_pixel_features` for the raw-pixel baseline. The runner is
    opened (the model loaded) only once the images are listed and checked."""
    started = time.perf_counter()
    store_path = store_location(store_path)
    # 1. The inputs: images (hashed, so a changed image is a changed store) and their labels
    # (same-stem .npy maps, or masks in a COCO file).
    records = list_images(images_dir)
    if coco is not None and classes is None:
        classes = coco_class_info(read_coco(coco))
    labeled = records_with_coco_labels(records, coco, classes) if coco is not None else contextlib.nullcontext(records)
    with labeled as records:
        check_labels_complete(records, images_dir)
        originals = check_examples(records, classes)  # each image's own (H, W)
        with open_runner() as runner:
            # 2. The store, created from its full schema or reopened to resume.
            shape, other_shapes = extraction_shape(originals, size, resize, runner.size_multiple())
            source = runner.describe(shape)
            schema = StoreSchema(
                layout=layout,
                image_size=sizes.recorded_size(shape),
                steps=source.steps,
                tap_shapes=source.tap_shapes,
                source=source.provenance,
                image_names=[record.name for record in records],
                image_sha256=[file_sha256(record.image_path) for record in records],
                classes=None if classes is None else {"names": classes.names, "ignore_label": classes.ignore_label},
                code_sha256=code_sha256,
                original_sizes=None if set(originals) == {shape} else [list(original) for original in originals],
            )
            with _disk_full_explained(store_path, None):
                writer = open_store_for_writing(store_path, schema, codec, replace_mismatched)
                relabel_finished_images(writer, records, shape)
            written = _write_pending(writer, runner, records, classes, batch_size, store_path, show_progress)
    return ExtractionSummary(
        store_path=store_path,
        images_total=len(records),
        images_written=written,
        feature_dim=schema.feature_dim,
        seconds=time.perf_counter() - started,
        device=runner.where,
        image_shape=shape,
        images_of_other_shapes=other_shapes,
    )


def _write_pending(writer: FeatureStoreWriter, runner: BatchRunner, records: list[ImageRecord],
                   classes: ClassInfo | None, batch_size: int, store_path, show_progress: bool) -> int:
    """Batches of the pending images through the source, each image written as soon as it is
    done; returns how many this run wrote."""
    pending = writer.pending_images()
    if len(pending) < len(records):
        logger.info("%s: %d of %d images already done", store_path, len(records) - len(pending), len(records))
    batches = [pending[start : start + batch_size] for start in range(0, len(pending), batch_size)]
    written = 0
    with tqdm(total=len(pending), unit="image", desc="extract", disable=not show_progress) as progress, \
            _disk_full_explained(store_path, writer):
        for covered, written_now in runner.run(writer, records, batches, classes):
            progress.update(covered)
            written += written_now
    return written


def relabel_finished_images(writer: FeatureStoreWriter, records: list[ImageRecord], shape: ImageShape) -> list[str]:
    """Finished images whose label map changed since they were written (a person corrected or
    added it) get the new one, their features kept (`FeatureStoreWriter.replace_labels`); an
    image whose chunks fail their checksum is left pending, to be extracted again. Returns the
    names of the images relabeled."""
    done = set(range(len(records))) - set(writer.pending_images())
    relabeled = []
    for index in sorted(done):
        labels = load_label_map(records[index], shape)
        wanted = np.full(shape, NO_LABELS, np.int16) if labels is None else labels.astype(np.int16)
        if np.array_equal(writer.group["labels"][index], wanted):
            continue
        if writer.replace_labels(index, labels):
            relabeled.append(records[index].name)
        else:
            logger.warning("%s: image %s fails its checksum; it is extracted again", writer.location, records[index].name)
    if relabeled:
        logger.info("%s: new label maps for %d finished images (features kept): %s", writer.location, len(relabeled),
                    ", ".join(relabeled[:10]))
    return relabeled


def extraction_shape(
    originals: list[ImageShape], size: int | list[int], resize: str | None, multiple: int
) -> tuple[ImageShape, int]:
    """The store's (H, W), and how many of the images (their `originals` (H, W)) have another
    aspect ratio (resized to it all the same).

    With a `resize` rule, the shape is the rule applied to the folder's most common image size;
    otherwise `size`. Either way each side must be a multiple of the model's `multiple`.

    Raises:
        ValueError: a size the model cannot take, naming it and the multiple.
    """
    if resize is not None:
        most_common = collections.Counter(originals).most_common(1)[0][0]
        shape = sizes.apply_rule(resize, most_common, multiple)
    else:
        shape = sizes.as_shape(size)
    sizes.check_multiple(shape, multiple, "this model")
    aspect = shape[1] / shape[0]
    other_shapes = sum(1 for height, width in originals if abs(width / height - aspect) > 0.02 * aspect)
    if other_shapes:
        logger.warning("%d of %d images have another aspect ratio than the store's %s: they are resized to it",
                       other_shapes, len(originals), sizes.describe(shape))
    return shape, other_shapes
