"""Where extraction batches run: this process or a Dask cluster, behind one protocol."""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

from pipeline.config import ExtractSettings
from pipeline.data.folders import ClassInfo, ImageRecord
from pipeline.extraction.compute import ComputedBatch, SourceDescription, compute_batch, describe_source, write_batch
from pipeline.extraction.dask_runner import ClusterBatches
from pipeline.runtime.cluster import cluster_client
from pipeline.sizes import ImageShape
from pipeline.sources.base import FeatureSource
from pipeline.sources.loading import load_source
from pipeline.store.writer import FeatureStoreWriter

logger = logging.getLogger(__name__)


class BatchRunner(Protocol):
    """Where extraction's batches run: this process (`InProcessBatches`) or a Dask cluster
    (`pipeline.extraction.dask_runner.ClusterBatches`)."""

    where: str  # for the summary: "cpu", "cuda:0", "Dask cluster tcp://… (4 workers, …)"

    def size_multiple(self) -> int:
        """Both sides of an input must be multiples of this (the model's total downsampling)."""

    def describe(self, shape: ImageShape) -> SourceDescription:
        """The source's provenance, steps and tap shapes for inputs of `shape` (H, W)."""

    def run(
        self, writer: FeatureStoreWriter, records: Sequence[ImageRecord], batches: list[list[int]],
        classes: ClassInfo | None,
    ) -> Iterator[tuple[int, int]]:
        """Extracts the batches; yields (images a batch covered, images it wrote) as they finish."""


class InProcessBatches:
    """Runs the batches one after the other in this process, on one loaded source, with the
    store writes of one batch overlapping the model's work on the next.

    One writer thread writes a computed batch while the next one computes; at most two batches'
    outputs are held on the host (the one being written and the one waiting for it), so memory
    stays flat. Blosc, zstd and file writes release the GIL, so the two really overlap.
    """

    def __init__(self, source: FeatureSource):
        self.source = source
        self.where = str(source.device)

    def size_multiple(self) -> int:
        return self.source.size_multiple

    def describe(self, shape: ImageShape) -> SourceDescription:
        return describe_source(self.source, shape)

    def run(
        self, writer: FeatureStoreWriter, records: Sequence[ImageRecord], batches: list[list[int]],
        classes: ClassInfo | None,
    ) -> Iterator[tuple[int, int]]:
        """Extracts each batch; yields (images it covered, images this run wrote) once written.

        Images another process holds (a claim on a local store) are skipped, then waited for at
        the end and written here if that process died: a run that returns leaves a complete store.
        """
        def compute(claimed: list[int]) -> ComputedBatch:
            chosen = {index: records[index] for index in claimed}
            return compute_batch(self.source, writer, chosen, claimed, writer.schema.image_shape, classes)

        failed = threading.Event()  # a failed write (a full disk) stops the writes queued after it
        with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer") as pool:
            previous: tuple[int, concurrent.futures.Future] | None = None  # (images covered, its write)
            for batch in batches:
                claim = contextlib.ExitStack()  # released by the writer thread once the batch is written
                try:
                    computed = compute(claim.enter_context(writer.claim(batch)))
                except BaseException:
                    claim.close()
                    raise
                current = (len(batch), pool.submit(_write_then_release, writer, computed, claim, failed))
                if previous is not None:
                    yield previous[0], previous[1].result()  # a failed write raises here
                previous = current
            if previous is not None:
                yield previous[0], previous[1].result()
        for index in writer.pending_images():  # held by another writer a moment ago
            with writer.claim([index], wait=True) as claimed:
                yield 0, write_batch(writer, compute(claimed))


def _write_then_release(
    writer: FeatureStoreWriter, computed: ComputedBatch, claim: contextlib.ExitStack, failed: threading.Event
) -> int:
    try:
        if failed.is_set():
            return 0
        return write_batch(writer, computed)
    except BaseException:
        failed.set()
        raise
    finally:
        claim.close()


@contextlib.contextmanager
def batch_runner(checkpoint: str | Path, settings: ExtractSettings) -> Iterator[BatchRunner]:
    """In-process batches, or the Dask cluster's when `settings.scheduler` names one."""
    if settings.scheduler is None:
        source = load_source(checkpoint, settings)
        yield InProcessBatches(source)
        return
    with cluster_client(settings.scheduler) as client, ClusterBatches(client, checkpoint, settings) as batches:
        yield batches

