"""Step 3 of the evaluation: masks and pictures drawn from stored predictions.

What is drawn is what was scored: the masks are the stored labels (`pipeline.evaluation.predictions`).
The images and ground truth come from the feature store the predictions were made from.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from pipeline.data.folders import resize_nearest
from pipeline.evaluation.predictions import Predictions
from pipeline.pictures.figures import save_per_class_iou_chart, save_prediction_grid
from pipeline.pictures.masks import class_palette, overlay, save_png
from pipeline.store.reader import FeatureStore

logger = logging.getLogger(__name__)


def write_masks_and_pictures(
    predictions: Predictions | str | Path,
    store_path: str | Path,
    out_dir: str | Path,
    pictures: int = 6,
    show_progress: bool = True,
    refined_from: Predictions | None = None,
) -> None:
    """Writes into `out_dir`: `masks/<name>.npy` (the predicted labels at the image's own size,
    by nearest neighbour from the store's, int16 (H, W)), `masks/<name>.png` (their overlay on the
    image, enlarged from the store's to that size) and `predictions.png` (image | ground truth |
    prediction | uncertainty at the store's size, for the first `pictures` images), one image at a time.
    `refined_from`: when `predictions` are a refiner's, the predictions it refined; the grid then
    shows them as "prediction" and these as "refined".
    """
    predictions = predictions if isinstance(predictions, Predictions) else Predictions(predictions)
    store = FeatureStore(store_path, cache_megabytes=0)
    store_index = {name: index for index, name in enumerate(store.image_names)}
    missing = [name for name in predictions.image_names if name not in store_index]
    if missing:
        raise ValueError(f"{len(missing)} predicted images are not in the store at {store.path}, e.g. {missing[0]!r}")
    out_dir = Path(out_dir)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    palette = class_palette(predictions.num_classes)
    grid_rows = []
    for position, name in enumerate(tqdm(predictions.image_names, desc="masks", unit="image", disable=not show_progress)):
        labels, image = predictions.labels(position), store.image(store_index[name])
        height, width = store.schema.original_shape(store_index[name])
        own_size_labels = resize_nearest(labels, (height, width))
        own_size_image = np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))
        np.save(out_dir / "masks" / f"{name}.npy", own_size_labels.astype(np.int16))
        save_png(out_dir / "masks" / f"{name}.png",
                 overlay(own_size_image, own_size_labels, palette, ignore_label=predictions.ignore_label))
        if len(grid_rows) < pictures:
            row = {"image": image, "ground_truth": store.labels(store_index[name]), "prediction": labels,
                   "uncertainty": predictions.uncertainty(position), "title": name}
            if refined_from is not None:
                row |= {"prediction": refined_from.labels(refined_from.position(name)), "refined": labels}
            grid_rows.append(row)
    if grid_rows:
        save_prediction_grid(out_dir / "predictions.png", grid_rows, predictions.class_names, predictions.ignore_label)


def write_per_class_chart(metrics: dict, out_dir: str | Path) -> None:
    """Writes `per_class_iou.png`: the metrics' per-class IoU, titled with their mIoU."""
    save_per_class_iou_chart(
        Path(out_dir) / "per_class_iou.png", metrics["per_class_iou"], f"per-class IoU (mIoU {metrics['miou']})"
    )
