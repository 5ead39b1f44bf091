"""Running the pipeline on a Dask distributed cluster: extraction batches as tasks, one model per worker.

The driver (the `extract` command) lists and checks the images, creates the store from its
schema, and submits one task per batch of pending images. Each worker loads the UNet once, on
its first task, through a worker plugin, opens the store once, and writes each image of its
batches straight into the image's own region of the store (`pipeline.extraction.compute.extract_batch`,
the same function the in-process run calls): regions never share a chunk, so no locks.

Failures are Dask's to handle: a task that raises is retried `TASK_RETRIES` times, and a task
whose worker dies is rescheduled on another one (the scheduler's `allowed-failures`). A retried
batch skips the images already marked done, so retries are harmless.

The workers must reach the checkpoint and the images at the paths the driver sees (a shared
file system) and the store at its path or URL. GPU workers declared with
`dask worker ADDRESS --resources GPU=1` get one task at a time each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import dask.base
import distributed
import torch

from pipeline.config import ExtractSettings
from pipeline.data.folders import ClassInfo, ImageRecord
from pipeline.extraction import compute
from pipeline.extraction.compute import SourceDescription
from pipeline.runtime.cluster import shared_value
from pipeline.sizes import ImageShape
from pipeline.sources import loading  # called as loading.load_source(): a test plugin swaps it
from pipeline.sources.base import FeatureSource
from pipeline.store.locations import Location, is_url
from pipeline.store.schema import StoreSchema
from pipeline.store.writer import FeatureStoreWriter, open_store_for_writing

logger = logging.getLogger(__name__)

TASK_RETRIES = 2  # retries of a task that raised (a worker that dies is handled by the scheduler)


def _workers(client: distributed.Client) -> dict:
    return client.scheduler_info(n_workers=-1)["workers"]


class ModelPerWorker(distributed.WorkerPlugin):
    """A worker's extraction state: the model, loaded on first use, and the open store.

    Args:
        checkpoint: the checkpoint, at a path every worker reads.
        settings: the taps (`blocks`), steps, noise seed and device ("auto": the worker's GPU if it
            has one).
    """

    def __init__(self, checkpoint: str, settings: ExtractSettings):
        self.checkpoint = checkpoint
        self.settings = settings

    def setup(self, worker: distributed.Worker) -> None:
        self.lock = threading.Lock()  # a worker with several threads may start several tasks at once
        self.source: FeatureSource | None = None
        self.writers: dict[Location, FeatureStoreWriter] = {}

    def teardown(self, worker: distributed.Worker) -> None:
        self.source, self.writers = None, {}
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def model(self) -> FeatureSource:
        with self.lock:
            if self.source is None:
                self.source = loading.load_source(self.checkpoint, self.settings)
                logger.info("worker loaded %s on %s", self.checkpoint, self.source.device)
            return self.source

    def writer(self, location: Location, schema: StoreSchema) -> FeatureStoreWriter:
        with self.lock:
            if location not in self.writers:
                # Refuses a store whose schema differs, e.g. one replaced by another run meanwhile.
                self.writers[location] = open_store_for_writing(location, schema)
            return self.writers[location]


def _plugin(name: str) -> ModelPerWorker:
    return distributed.get_worker().plugins[name]


def _describe_on_worker(plugin_name: str, shape: ImageShape) -> SourceDescription:
    return compute.describe_source(_plugin(plugin_name).model(), shape)


def _size_multiple_on_worker(plugin_name: str) -> int:
    return _plugin(plugin_name).model().size_multiple


def _extract_batch_on_worker(
    plugin_name: str,
    location: Location,
    schema: StoreSchema,
    records: dict[int, ImageRecord],
    batch: list[int],
    classes: ClassInfo | None,
) -> int:
    state = _plugin(plugin_name)
    return compute.extract_batch(state.model(), state.writer(location, schema), records, batch, schema.image_shape, classes)


def _absolute(record: ImageRecord) -> ImageRecord:
    """The record with absolute paths: a worker's working directory is not the driver's."""
    label_path = None if record.label_path is None else record.label_path.resolve()
    return dataclasses.replace(record, image_path=record.image_path.resolve(), label_path=label_path)


class ClusterBatches:
    """Runs extraction batches as tasks on a Dask cluster (the counterpart of `InProcessBatches`).

    Use as a context manager: on exit the model is released on every worker.
    """

    def __init__(self, client: distributed.Client, checkpoint: str | Path, settings: ExtractSettings):
        self.client = client
        self.settings = settings
        checkpoint = str(Path(checkpoint).resolve())
        model_settings = (settings.blocks, settings.steps, settings.seed, settings.device, settings.noise_draws,
                          settings.prompt, settings.prompt_embeds)
        self.plugin_name = f"segcache-model-{dask.base.tokenize(checkpoint, *model_settings)}"
        client.register_plugin(ModelPerWorker(checkpoint, settings), name=self.plugin_name)
        workers = _workers(client)
        if not workers:
            logger.warning("the Dask scheduler %s has no workers yet: the tasks wait for them", client.scheduler.address)
        # Where workers declare GPUs (`--resources GPU=1`), every task takes one: one batch per GPU at a time.
        gpu_workers = sum(1 for info in workers.values() if info.get("resources", {}).get("GPU", 0) > 0)
        self.resources = {"GPU": 1} if gpu_workers else None
        self.where = f"Dask cluster {client.scheduler.address} ({len(workers)} workers, {gpu_workers} with GPUs)"

    def __enter__(self) -> ClusterBatches:
        return self

    def __exit__(self, *exc_info) -> None:
        with contextlib.suppress(Exception):  # the cluster may be gone; nothing of ours to lose then
            self.client.unregister_worker_plugin(self.plugin_name)

    def describe(self, shape: ImageShape) -> SourceDescription:
        """The source's description, computed on a worker (the driver never loads the model)."""
        future = self.client.submit(
            _describe_on_worker, self.plugin_name, shape, resources=self.resources, pure=False, retries=TASK_RETRIES,
        )
        return future.result()

    def size_multiple(self) -> int:
        """The model's size multiple, asked of a worker (the driver never loads the model)."""
        future = self.client.submit(
            _size_multiple_on_worker, self.plugin_name, resources=self.resources, pure=False, retries=TASK_RETRIES,
        )
        return future.result()

    def run(
        self, writer: FeatureStoreWriter, records: Sequence[ImageRecord], batches: list[list[int]],
        classes: ClassInfo | None,
    ) -> Iterator[tuple[int, int]]:
        """Submits every batch; yields (its number of images, the same again) as each finishes:
        a finished task leaves every image of its batch done, whichever attempt wrote it.

        Raises:
            The first error a task still raised after its retries; the other tasks are cancelled.
        """
        location = writer.location if is_url(writer.location) else Path(writer.location).resolve()
        schema = shared_value(self.client, writer.schema)  # sent to each worker once, not per task
        futures = [
            self.client.submit(
                _extract_batch_on_worker, self.plugin_name, location, schema,
                {index: _absolute(records[index]) for index in batch}, batch, classes,
                resources=self.resources, retries=TASK_RETRIES, pure=False,
            )
            for batch in batches
        ]
        sizes = {future.key: len(batch) for future, batch in zip(futures, batches)}
        try:
            for future in distributed.as_completed(futures):
                future.result()
                yield sizes[future.key], sizes[future.key]
        finally:
            self.client.cancel(futures)
