"""The extract stage: images → noised copies → UNet decoder activations → feature store.

The compute is in pipeline/activations.py; here: checking the images, creating or resuming
the store, and running the batches where `BatchRunner` says (this process or a Dask cluster).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

from tqdm.auto import tqdm

from pipeline.activations import ModelDescription, describe_model, extract_batch, load_extractor
from pipeline.cluster import cluster_client
from pipeline.config import ExtractSettings
from pipeline.datasets import (
    ClassInfo,
    ImageRecord,
    file_sha256,
    list_images,
    check_examples,
    check_labels_complete,
)
from pipeline.distributed import ClusterBatches
from pipeline.storage import store_location
from pipeline.store import ExtractionSummary, FeatureStoreWriter, StoreSchema, open_store_for_writing

logger = logging.getLogger(__name__)


class BatchRunner(Protocol):
    """Where extraction's batches run: this process (`InProcessBatches`) or a Dask cluster
    (`pipeline.distributed.ClusterBatches`)."""

    where: str  # for the summary: "cpu", "cuda:0", "Dask cluster tcp://… (4 workers, …)"

    def describe(self) -> ModelDescription:
        """The model's provenance and block shapes at the extraction size."""

    def run(
        self, writer: FeatureStoreWriter, records: Sequence[ImageRecord], batches: list[list[int]],
        classes: ClassInfo | None,
    ) -> Iterator[tuple[int, int]]:
        """Extracts the batches; yields (images a batch covered, images it wrote) as they finish."""


class InProcessBatches:
    """Runs the batches one after the other in this process, on one loaded model."""

    def __init__(self, checkpoint: str | Path, settings: ExtractSettings):
        self.settings = settings
        self.extractor = load_extractor(checkpoint, settings.blocks, settings.device)
        self.where = str(self.extractor.device)

    def describe(self) -> ModelDescription:
        return describe_model(self.extractor, self.settings.size)

    def run(
        self, writer: FeatureStoreWriter, records: Sequence[ImageRecord], batches: list[list[int]],
        classes: ClassInfo | None,
    ) -> Iterator[tuple[int, int]]:
        """Extracts each batch; yields (images it covered, images this run wrote) as it goes.

        Images another process holds (a claim on a local store) are skipped, then waited for at
        the end and written here if that process died: a run that returns leaves a complete store.
        """
        def write(claimed: list[int]) -> int:
            chosen = {index: records[index] for index in claimed}
            return extract_batch(self.extractor, writer, chosen, claimed, self.settings, classes) if claimed else 0

        for batch in batches:
            with writer.claim(batch) as claimed:
                written = write(claimed)
            yield len(batch), written
        for index in writer.pending_images():  # held by another writer a moment ago
            with writer.claim([index], wait=True) as claimed:
                yield 0, write(claimed)


@contextlib.contextmanager
def batch_runner(checkpoint: str | Path, settings: ExtractSettings) -> Iterator[BatchRunner]:
    """In-process batches, or the Dask cluster's when `settings.scheduler` names one."""
    if settings.scheduler is None:
        yield InProcessBatches(checkpoint, settings)
        return
    with cluster_client(settings.scheduler) as client, ClusterBatches(client, checkpoint, settings) as batches:
        yield batches


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
    """
    started = time.perf_counter()
    store_path = store_location(store_path)
    # 1. The inputs: images (hashed, so a changed image is a changed store).
    records = list_images(images_dir)
    check_labels_complete(records, images_dir)
    check_examples(records, classes)
    with batch_runner(checkpoint, settings) as runner:
        # 2. The store, created from its full schema or reopened to resume.
        model = runner.describe()
        schema = StoreSchema(
            layout=settings.layout,
            image_size=settings.size,
            steps=list(settings.steps),
            block_shapes=model.block_shapes,
            checkpoint_sha256=model.checkpoint_sha256,
            architecture=model.architecture,
            noise_seed=settings.seed,
            image_names=[record.name for record in records],
            image_sha256=[file_sha256(record.image_path) for record in records],
            classes=None if classes is None else {"names": classes.names, "ignore_label": classes.ignore_label},
        )
        with _disk_full_explained(store_path, None):
            writer = open_store_for_writing(store_path, schema, settings.codec, replace_mismatched)
        pending = writer.pending_images()
        if len(pending) < len(records):
            logger.info("%s: %d of %d images already done", store_path, len(records) - len(pending), len(records))
        # 3. Batches of pending images through the UNet, each image written as soon as it is done.
        batches = [pending[start : start + settings.batch_size] for start in range(0, len(pending), settings.batch_size)]
        written = 0
        with tqdm(total=len(pending), unit="image", desc="extract", disable=not show_progress) as progress, \
                _disk_full_explained(store_path, writer):
            for covered, written_now in runner.run(writer, records, batches, classes):
                progress.update(covered)
                written += written_now
    return ExtractionSummary(
        store_path=store_path,
        images_total=len(records),
        images_written=written,
        feature_dim=schema.feature_dim,
        seconds=time.perf_counter() - started,
        device=runner.where,
    )
