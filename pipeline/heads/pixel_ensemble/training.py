"""The train stage: labeled pixels of a feature store → a trained, saved ensemble."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.config import TrainSettings
from pipeline.data.folders import ClassInfo
from pipeline.heads.pixel_ensemble.ensemble import Ensemble, save_ensemble
from pipeline.heads.pixel_ensemble.members import train_ensemble, train_fused
from pipeline.heads.pixel_ensemble.sampling import PixelStream, return_large_allocations_promptly, select_labeled_pixels
from pipeline.runtime.cluster import cluster_client
from pipeline.runtime.devices import pick_device, torch_threads
from pipeline.store.reader import FeatureStore

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainingSummary:
    """What a training run did."""

    ensemble_dir: Path
    training_pixels: int
    feature_dim: int
    seconds: float
    epochs_per_member: list[int]


def train_on_store(
    store_path: str | Path,
    out_dir: str | Path,
    settings: TrainSettings,
    classes: ClassInfo | None = None,
    show_progress: bool = True,
    images: Sequence[int] | None = None,
) -> tuple[Ensemble, TrainingSummary]:
    """Trains an ensemble on every labeled pixel of a store and saves it to `out_dir`: on all the
    store's features, or on `settings.steps` and `settings.blocks` of them (read alone; the
    ensemble records which, so evaluate and predict read the same ones).

    With `settings.scheduler` set, the features are read by that Dask cluster's workers and sent
    here, where the ensemble trains. `images`: train on these of the store's images only (their
    indices; None: all), e.g. the training folds of a cross-validation.
    """
    started = time.perf_counter()
    return_large_allocations_promptly()  # else table reads past the cache pile up in glibc's heaps
    store = FeatureStore(store_path, settings.cache_megabytes, settings.steps, settings.blocks)
    classes = store.class_info(classes)
    pixels = select_labeled_pixels(store, classes.num_classes, classes.ignore_label, settings.min_class_pixels, classes.names)
    if images is not None:
        pixels = pixels.of_images(images)
    logger.info("%d labeled pixels of %d classes from %s", len(pixels), classes.num_classes, store_path)
    device = pick_device(settings.device)
    with torch_threads(settings.threads), cluster_client(settings.scheduler) as client:
        if settings.protocol == "fast":
            stream = PixelStream(store, pixels, settings.fast_batch_size, settings.buffer_pixels, client)
            members, logs = train_fused(
                lambda epoch: stream.member_batches(np.random.default_rng([settings.seed, epoch]), settings.members),
                store.feature_dim, classes.num_classes, len(pixels), settings, device, show_progress,
            )
            ensemble = Ensemble(members, store.feature_dim, classes.names, classes.ignore_label, store.feature_description(), logs)
        else:
            stream = PixelStream(store, pixels, settings.batch_size, settings.buffer_pixels, client)

            def epoch_batches(member: int, epoch: int):
                # Each member and epoch gets its own pixel order, reproducible from the seed.
                return stream.batches(np.random.default_rng([settings.seed, member, epoch]))

            ensemble = train_ensemble(
                epoch_batches, store.feature_dim, classes.names, classes.ignore_label,
                store.feature_description(), settings, device, show_progress,
            )
    save_ensemble(ensemble, out_dir)
    summary = TrainingSummary(
        ensemble_dir=Path(out_dir),
        training_pixels=len(pixels),
        feature_dim=store.feature_dim,
        seconds=time.perf_counter() - started,
        epochs_per_member=[log.epochs for log in ensemble.logs],
    )
    return ensemble, summary
