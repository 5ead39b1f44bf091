"""Step 2 of the evaluation: stored predictions + label maps → the metrics (`metrics.json`).

Reads only a predictions folder (`pipeline.evaluation.predictions`) and the ground truth, never
features or models, so raw and refined predictions are scored the same way.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pipeline.config import IoUDefinition
from pipeline.evaluation.predictions import Predictions
from pipeline.metrics import IoUAccumulator
from pipeline.store.reader import FeatureStore

logger = logging.getLogger(__name__)

# image name → its label map int (S, S), or None when it has none
LabelSource = Callable[[str], "np.ndarray | None"]


def _nan_to_none(value: float) -> float | None:
    return None if math.isnan(value) else round(float(value), 6)


def store_labels(store: FeatureStore | str | Path) -> LabelSource:
    """The label maps a feature store holds, by image name."""
    store = store if isinstance(store, FeatureStore) else FeatureStore(store, cache_megabytes=0)
    positions = {name: index for index, name in enumerate(store.image_names)}

    def labels(name: str) -> np.ndarray | None:
        if name not in positions:
            raise KeyError(f"no image {name!r} in the store at {store.path}")
        return store.labels(positions[name])

    return labels


def score_predictions(
    predictions: Predictions | str | Path,
    labels: LabelSource | FeatureStore | str | Path,
    iou: IoUDefinition = "paper",
    out_json: str | Path | None = None,
    show_progress: bool = True,
) -> dict:
    """Scores every stored prediction against its label map (images without one are predicted
    but not scored), summing intersections and unions over the images before dividing.

    Args:
        predictions: a predictions folder, or one opened.
        labels: image name → label map, or a feature store (its labels) or its path.
        iou: which definition `miou` and `per_class_iou` use (metrics hold both means).
        out_json: where to write the metrics as JSON, if anywhere.

    Returns:
        miou (under `iou`), iou_definition, miou_paper, miou_ignore_excluded, pixel_accuracy,
        mean_uncertainty (mean over images of their uncertainty score; None without one),
        per_class_iou (by class name, under `iou`) and images (how many were predicted).
    """
    predictions = predictions if isinstance(predictions, Predictions) else Predictions(predictions)
    if not callable(labels):
        labels = store_labels(labels)
    accumulator = IoUAccumulator(predictions.num_classes, predictions.ignore_label)
    uncertainty_scores = []
    for position, name in enumerate(tqdm(predictions.image_names, desc="score", unit="image", disable=not show_progress)):
        target = labels(name)
        if target is not None:
            accumulator.update(predictions.labels(position), target)
        if predictions.has_uncertainty:
            uncertainty_scores.append(predictions.uncertainty_score(position))
    per_class = accumulator.per_class_iou(iou)
    metrics = {
        "miou": _nan_to_none(accumulator.mean_iou(iou)),
        "iou_definition": iou,
        "miou_paper": _nan_to_none(accumulator.mean_iou("paper")),
        "miou_ignore_excluded": _nan_to_none(accumulator.mean_iou("ignore_excluded")),
        "pixel_accuracy": _nan_to_none(accumulator.pixel_accuracy()),
        "mean_uncertainty": _nan_to_none(float(np.mean(uncertainty_scores))) if uncertainty_scores else None,
        "per_class_iou": {
            predictions.class_names[k]: _nan_to_none(per_class[k]) for k in accumulator.scored_classes()
        },
        "images": len(predictions),
    }
    if out_json is not None:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(metrics, indent=1))
    return metrics
