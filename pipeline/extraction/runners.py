"""Where extraction batches run: this process or a Dask cluster, behind one protocol."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

from pipeline.config import ExtractSettings
from pipeline.data.folders import ClassInfo, ImageRecord
from pipeline.extraction.compute import SourceDescription, describe_source, extract_batch
from pipeline.extraction.dask_runner import ClusterBatches
from pipeline.runtime.cluster import cluster_client
from pipeline.sources.base import FeatureSource
from pipeline.sources.loading import load_source
from pipeline.store.writer import FeatureStoreWriter

logger = logging.getLogger(__name__)


class BatchRunner(Protocol):
    """Where extraction's batches run: this process (`InProcessBatches`) or a Dask cluster
    (`pipeline.extraction.dask_runner.ClusterBatches`)."""

    where: str  # for the summary: "cpu", "cuda:0", "Dask cluster tcp://… (4 workers, …)"

    def describe(self) -> SourceDescription:
        """The source's provenance, steps and tap shapes at the extraction size."""

    def run(
        self, writer: FeatureStoreWriter, records: Sequence[ImageRecord], batches: list[list[int]],
        classes: ClassInfo | None,
    ) -> Iterator[tuple[int, int]]:
        """Extracts the batches; yields (images a batch covered, images it wrote) as they finish."""


class InProcessBatches:
    """Runs the batches one after the other in this process, on one loaded source of size×size features."""

    def __init__(self, source: FeatureSource, size: int):
        self.source = source
        self.size = size
        self.where = str(source.device)

    def describe(self) -> SourceDescription:
        return describe_source(self.source, self.size)

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
            return extract_batch(self.source, writer, chosen, claimed, self.size, classes) if claimed else 0

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
        source = load_source(checkpoint, settings)
        yield InProcessBatches(source, settings.size)
        return
    with cluster_client(settings.scheduler) as client, ClusterBatches(client, checkpoint, settings) as batches:
        yield batches

