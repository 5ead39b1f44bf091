"""Where extraction batches run: this process or a Dask cluster, behind one protocol."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

from pipeline.config import ExtractSettings
from pipeline.data.folders import ClassInfo, ImageRecord
from pipeline.extraction.compute import ModelDescription, describe_model, extract_batch
from pipeline.extraction.dask_runner import ClusterBatches
from pipeline.runtime.cluster import cluster_client
from pipeline.sources.diffusion_unet import load_extractor
from pipeline.store.writer import FeatureStoreWriter

logger = logging.getLogger(__name__)


class BatchRunner(Protocol):
    """Where extraction's batches run: this process (`InProcessBatches`) or a Dask cluster
    (`pipeline.extraction.dask_runner.ClusterBatches`)."""

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

