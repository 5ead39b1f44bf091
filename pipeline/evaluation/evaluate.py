"""The evaluate stage: test features → ensemble votes → masks, pictures and metrics."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pipeline.config import EvaluateSettings
from pipeline.evaluation.predict import check_ensemble_matches_store, predict_image
from pipeline.evaluation.score import IoUAccumulator
from pipeline.heads.pixel_ensemble.ensemble import load_ensemble
from pipeline.pictures.figures import save_per_class_iou_chart, save_prediction_grid
from pipeline.pictures.masks import class_palette, overlay, save_png
from pipeline.runtime.devices import torch_threads
from pipeline.store.reader import FeatureStore

logger = logging.getLogger(__name__)


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

