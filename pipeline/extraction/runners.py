"""Where extraction batches run: this process or a Dask cluster, behind one protocol."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

from pipeline.config import ExtractSettings
from pipeline.data.folders import ClassInfo, ImageRecord
from pipeline.extraction.compute import (
    IMAGES_IN_FLIGHT,
    ComputedBatch,
    SourceDescription,
    compute_batch,
    describe_source,
    write_batch,
)
from pipeline.extraction.dask_runner import ClusterBatches
from pipeline.runtime.cluster import cluster_client
from pipeline.runtime.futures import results_in_order
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

    Writer threads write the computed batches' images, `IMAGES_IN_FLIGHT` at a time and in order,
    while the next batch computes; the next batch's first image starts as soon as a thread is
    free, so the disk does not wait at batch ends. At most two batches' outputs are held on the
    host (the one being written and the one just computed), so memory stays flat. Blosc, zstd,
    CRC32C and file writes release the GIL, so writes and the model really overlap.
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
        A failed write (a full disk) drops the writes queued after it and raises once the running
        ones have ended.
        """
        def compute(claimed: list[int]) -> ComputedBatch:
            # A claim holds only pending images: their done marks were just read.
            chosen = {index: records[index] for index in claimed}
            return compute_batch(self.source, writer, chosen, claimed, writer.schema.image_shape, classes,
                                 pending=claimed)

        pool = concurrent.futures.ThreadPoolExecutor(IMAGES_IN_FLIGHT, thread_name_prefix="store-writer")
        in_flight: collections.deque[_BatchWrites] = collections.deque()  # oldest first, at most two
        try:
            for batch in batches:
                claim = contextlib.ExitStack()  # released once the batch is written
                try:
                    computed = compute(claim.enter_context(writer.claim(batch)))
                    in_flight.append(_BatchWrites(len(batch), computed.submit_writes(writer, pool), claim))
                except BaseException:
                    claim.close()
                    raise
                if len(in_flight) == 2:
                    yield in_flight.popleft().finish()  # a failed write raises here
            while in_flight:
                yield in_flight.popleft().finish()
        finally:  # after an error: the queued writes dropped, the running ones ended, then the claims released
            pool.shutdown(wait=True, cancel_futures=True)
            for batch_writes in in_flight:
                batch_writes.claim.close()
        for index in writer.pending_images():  # held by another writer a moment ago
            with writer.claim([index], wait=True) as claimed:
                yield 0, write_batch(writer, compute(claimed))


@dataclasses.dataclass
class _BatchWrites:
    """One batch's queued image writes and the claim on its images, held until they end."""

    covered: int  # images of the batch (written now, earlier, or by another writer)
    writes: list[concurrent.futures.Future]
    claim: contextlib.ExitStack

    def finish(self) -> tuple[int, int]:
        """Waits for the writes, releases the claim; (images covered, images written)."""
        try:
            return self.covered, len(results_in_order(self.writes))
        finally:
            self.claim.close()


@contextlib.contextmanager
def batch_runner(checkpoint: str | Path, settings: ExtractSettings) -> Iterator[BatchRunner]:
    """In-process batches, or the Dask cluster's when `settings.scheduler` names one."""
    if settings.scheduler is None:
        source = load_source(checkpoint, settings)
        yield InProcessBatches(source)
        return
    with cluster_client(settings.scheduler) as client, ClusterBatches(client, checkpoint, settings) as batches:
        yield batches

