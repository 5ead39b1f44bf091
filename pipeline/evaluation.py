"""The evaluate stage: test features → ensemble votes → masks, pictures and metrics."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.config import EvaluateSettings
from pipeline.devices import torch_threads
from pipeline.ensemble import Ensemble, load_ensemble, predict_from_block_tables, predict_with_uncertainty
from pipeline.metrics import IoUAccumulator, top_decile_mean
from pipeline.store import FeatureStore, StoreMismatchError
from pipeline.visualize import class_palette, overlay, save_per_class_iou_chart, save_png, save_prediction_grid

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


def _nan_to_none(value: float) -> float | None:
    return None if math.isnan(value) else round(float(value), 6)


def evaluate_on_store(
    ensemble_dir: str | Path,
    store_path: str | Path,
    out_dir: str | Path,
    settings: EvaluateSettings,
    show_progress: bool = True,
) -> dict:
    """Predicts every image of a store, writes masks and pictures, and scores labeled images.

    Writes into `out_dir`: `masks/<name>.npy` (predicted labels), `masks/<name>.png` (overlay),
    `predictions.png` (a grid of the first images), `per_class_iou.png` and `metrics.json`.

    Returns:
        The metrics: miou (under `settings.iou`), miou_paper, miou_ignore_excluded, per_class_iou
        (by class name, under `settings.iou`), pixel_accuracy, mean_uncertainty.
    """
    ensemble_dir, out_dir = Path(ensemble_dir), Path(out_dir)
    ensemble = load_ensemble(ensemble_dir)
    # Each image is read once: no table cache, whose filling would grow with the test set.
    store = FeatureStore(store_path, cache_megabytes=0)
    check_ensemble_matches_store(ensemble, store, ensemble_dir)
    palette = class_palette(ensemble.num_classes)
    accumulator = IoUAccumulator(ensemble.num_classes, ensemble.ignore_label)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    uncertainties, grid_rows = [], []
    with torch_threads(settings.threads):
        for index in tqdm(np.flatnonzero(store.done_mask()), desc="evaluate", unit="image", disable=not show_progress):
            index, name = int(index), store.image_names[index]
            prediction = predict_image(ensemble, store, index, settings.pixels_per_batch)
            target, image = store.labels(index), store.image(index)
            if target is not None:
                accumulator.update(prediction.labels, target)
            uncertainties.append(prediction.uncertainty)
            np.save(out_dir / "masks" / f"{name}.npy", prediction.labels.astype(np.int16))
            save_png(out_dir / "masks" / f"{name}.png", overlay(image, prediction.labels, palette, ignore_label=ensemble.ignore_label))
            if len(grid_rows) < settings.pictures:
                grid_rows.append(
                    {"image": image, "ground_truth": target, "prediction": prediction.labels,
                     "uncertainty": prediction.disagreement, "title": name}
                )
    per_class = accumulator.per_class_iou(settings.iou)
    metrics = {
        "miou": _nan_to_none(accumulator.mean_iou(settings.iou)),
        "iou_definition": settings.iou,
        "miou_paper": _nan_to_none(accumulator.mean_iou("paper")),
        "miou_ignore_excluded": _nan_to_none(accumulator.mean_iou("ignore_excluded")),
        "pixel_accuracy": _nan_to_none(accumulator.pixel_accuracy()),
        "mean_uncertainty": _nan_to_none(float(np.mean(uncertainties))) if uncertainties else None,
        "per_class_iou": {
            ensemble.class_names[k]: _nan_to_none(per_class[k]) for k in accumulator.scored_classes()
        },
        "images": len(uncertainties),
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    save_prediction_grid(out_dir / "predictions.png", grid_rows, ensemble.class_names, ensemble.ignore_label)
    save_per_class_iou_chart(out_dir / "per_class_iou.png", metrics["per_class_iou"], f"per-class IoU (mIoU {metrics['miou']})")
    return metrics
