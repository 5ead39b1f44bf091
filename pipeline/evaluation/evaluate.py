"""The evaluate stage: predict → score → report, each step also callable alone.

1. `predict_store` (pipeline.evaluation.predict): test features → the ensemble's mean
   probabilities, voted labels and disagreement, stored in a predictions folder
   (pipeline.evaluation.predictions).
2. `score_predictions` (pipeline.evaluation.scoring): stored labels + the store's label maps →
   metrics.json.
3. `write_masks_and_pictures`, `write_per_class_chart` (pipeline.evaluation.report): masks and
   pictures drawn from the stored predictions.

A refiner sits between 1 and 2: it reads a predictions folder and writes another in the same
format, which steps 2 and 3 take as they take the ensemble's.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.config import EvaluateSettings
from pipeline.evaluation.predict import predict_store, predict_store_with_segmenter
from pipeline.evaluation.report import write_masks_and_pictures, write_per_class_chart
from pipeline.evaluation.scoring import score_predictions
from pipeline.heads.segmenter.segmenter import is_segmenter_folder

logger = logging.getLogger(__name__)

PREDICTIONS_FOLDER = "predictions.zarr"


def evaluate_on_store(
    ensemble_dir: str | Path,
    store_path: str | Path,
    out_dir: str | Path,
    settings: EvaluateSettings,
    show_progress: bool = True,
) -> dict:
    """Predicts every image of a store, scores the labeled ones, writes masks and pictures.

    `ensemble_dir` may also hold a segmenter (`train-segmenter`): it predicts from the store's
    images instead of its features.

    Writes into `out_dir`: `predictions.zarr` (the stored predictions), `metrics.json`,
    `masks/<name>.npy` (predicted labels), `masks/<name>.png` (overlay), `predictions.png`
    (a grid of the first images) and `per_class_iou.png`.

    Returns:
        The metrics: miou (under `settings.iou`), miou_paper, miou_ignore_excluded, per_class_iou
        (by class name, under `settings.iou`), pixel_accuracy, mean_uncertainty, images.
    """
    out_dir = Path(out_dir)
    if is_segmenter_folder(ensemble_dir):
        predictions = predict_store_with_segmenter(
            ensemble_dir, store_path, out_dir / PREDICTIONS_FOLDER, settings.threads, show_progress
        )
    else:
        predictions = predict_store(
            ensemble_dir, store_path, out_dir / PREDICTIONS_FOLDER, settings.pixels_per_batch, settings.threads,
            show_progress,
        )
    metrics = score_predictions(predictions, store_path, settings.iou, out_dir / "metrics.json", show_progress)
    write_masks_and_pictures(predictions, store_path, out_dir, settings.pictures, show_progress)
    write_per_class_chart(metrics, out_dir)
    return metrics
