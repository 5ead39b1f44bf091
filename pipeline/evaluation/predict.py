"""Predicting a store's images with an ensemble: per-pixel labels, probabilities and disagreement."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pipeline.evaluation.score import top_decile_mean
from pipeline.heads.pixel_ensemble.ensemble import Ensemble
from pipeline.heads.pixel_ensemble.inference import predict_from_block_tables, predict_with_uncertainty
from pipeline.store.reader import FeatureStore
from pipeline.store.schema import StoreMismatchError

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ImagePrediction:
    """One image's prediction: labels int64 (S, S), Jensen–Shannon map float32 (S, S)."""

    labels: np.ndarray
    disagreement: np.ndarray

    @property
    def uncertainty(self) -> float:
        return top_decile_mean(self.disagreement)


def check_ensemble_matches_store(ensemble: Ensemble, store: FeatureStore, ensemble_dir: Path) -> None:
    """Refuses to apply an ensemble to features other than those it was trained on."""
    expected, found = ensemble.features, store.feature_description()
    differing = [key for key in expected if expected.get(key) != found.get(key)]
    if differing:
        details = "; ".join(f"{key}: ensemble {expected.get(key)!r}, store {found.get(key)!r}" for key in differing)
        raise StoreMismatchError(
            f"the ensemble in {ensemble_dir} was trained on other features than {store.path} holds ({details}); "
            "extract the images with the ensemble's checkpoint, steps and blocks"
        )


def predict_pixels(
    ensemble: Ensemble, pixel_features: Callable[[np.ndarray, np.ndarray], np.ndarray], size: int, pixels_per_batch: int
) -> ImagePrediction:
    """Predicts every pixel of a size×size image, a band of rows at a time.

    Args:
        ensemble: the trained members.
        pixel_features: (ys, xs) → float32 (P, D) features of those pixels.
        size: the image's side.
        pixels_per_batch: about how many pixels go through the ensemble at once.
    """
    rows_per_band = max(1, pixels_per_batch // size)
    labels = np.empty((size, size), dtype=np.int64)
    disagreement = np.empty((size, size), dtype=np.float32)
    for top in range(0, size, rows_per_band):
        rows = np.arange(top, min(top + rows_per_band, size))
        ys, xs = np.repeat(rows, size), np.tile(np.arange(size), len(rows))  # the band's pixels, row-major
        features = torch.from_numpy(pixel_features(ys, xs))  # (P, D)
        band_labels, band_disagreement = predict_with_uncertainty(ensemble.members, features)
        labels[rows] = band_labels.numpy().reshape(len(rows), size)
        disagreement[rows] = band_disagreement.numpy().reshape(len(rows), size)
    return ImagePrediction(labels, disagreement)


def predict_from_tables(ensemble: Ensemble, tables: list[torch.Tensor], size: int) -> ImagePrediction:
    """Predicts every pixel of a size×size image from its block tables (per (step, block),
    (C_b, h_b, w_b)), each member's first layer at the blocks' own resolution."""
    labels, disagreement = predict_from_block_tables(ensemble.members, tables, size)
    # (S·S,) row-major -> (S, S)
    return ImagePrediction(labels.numpy().reshape(size, size), disagreement.numpy().reshape(size, size))


def predict_image(ensemble: Ensemble, store: FeatureStore, index: int, pixels_per_batch: int) -> ImagePrediction:
    """Predicts every pixel of one stored image (native stores: from the block tables at once;
    dense stores: a band of pixel vectors at a time)."""
    if store.layout == "native":
        return predict_from_tables(ensemble, store.block_tables(index), store.image_size)
    return predict_pixels(
        ensemble, lambda ys, xs: store.pixel_features(index, ys, xs), store.image_size, pixels_per_batch
    )

