"""Which images to label next: `suggest` ranks a store of unlabeled images by how unsure the
ensemble is of them, and writes the chosen ones' predicted masks for a labeling tool.

- uncertainty: the paper's per-image score, the mean of the top 10 % of the Jensen–Shannon
  divergence between the members' softmaxes; the K highest are chosen.
- diverse: the same scores, spread out over the images' content so that near-duplicates are not
  all chosen: among the more uncertain half of the images (at least K), the most uncertain
  first, then each time the one farthest from those chosen (k-center greedy), in a space of
  each image's pooled features (every feature channel averaged over the image, standardised
  over the store's images).
- random: K images drawn with the seed, the baseline the other two must beat.

"diverse" is the default, from a measurement on the demo's validation faces (never the test
split; `python -m bench.demo_suggestion_validation`, bench/results/demo_suggestion_validation.json):
from 5 labeled faces, three rounds of 5 more, 3 draws: mIoU at 10 / 15 / 20 faces 0.731 / 0.754 /
0.765 (diverse), 0.728 / 0.743 / 0.766 (uncertainty), 0.680 / 0.721 / 0.748 (random), and the
smallest spread over draws (±0.004 at 10 faces against ±0.038 for random).

The features come from the store, so nothing is extracted again; each image is predicted once
to score it and once more if chosen (for its pictures), so memory does not grow with the store.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pipeline.data.coco import CocoBuilder, write_coco
from pipeline.data.folders import ClassInfo, resize_nearest
from pipeline.evaluation.predict import open_store_for_ensemble, predict_image
from pipeline.heads.pixel_ensemble.ensemble import load_ensemble
from pipeline.pictures.figures import save_prediction_grid
from pipeline.pictures.masks import save_index_png
from pipeline.runtime.atomic import replaced_folder

STRATEGIES = ("uncertainty", "diverse", "random")
RANKING_FILE = "ranking.json"
CONTACT_SHEET = "suggestions.png"
COCO_FILE = "annotations.json"
PIXELS_PER_BATCH = 16384


@dataclasses.dataclass(frozen=True)
class Suggestion:
    """What `suggest_images` chose: the chosen images' names in order, and every image's score."""

    chosen: list[str]
    uncertainty: dict[str, float]
    out_dir: Path


def choose_images(uncertainty: np.ndarray, embeddings: np.ndarray, count: int, strategy: str,
                  seed: int = 0) -> list[int]:
    """Positions of the `count` images to label next (module docstring), in the order chosen.

    Args:
        uncertainty: (N,) each image's score.
        embeddings: (N, D) each image's pooled features (used by "diverse").
    """
    count = min(count, len(uncertainty))
    by_uncertainty = [int(position) for position in np.argsort(-uncertainty, kind="stable")]
    if strategy == "uncertainty":
        return by_uncertainty[:count]
    if strategy == "random":
        return [int(position) for position in np.random.default_rng(seed).permutation(len(uncertainty))[:count]]
    if strategy != "diverse":
        raise ValueError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    pool = by_uncertainty[:max(count, (len(uncertainty) + 1) // 2)]
    spread = embeddings.std(axis=0)
    points = (embeddings - embeddings.mean(axis=0)) / np.where(spread > 0, spread, 1.0)  # (N, D) standardised
    chosen = [pool[0]]
    distance = np.linalg.norm(points[pool] - points[pool[0]], axis=1)  # to the nearest chosen image
    while len(chosen) < count:
        farthest = pool[int(np.argmax(distance))]
        chosen.append(farthest)
        distance = np.minimum(distance, np.linalg.norm(points[pool] - points[farthest], axis=1))
    return chosen


def suggest_images(
    ensemble_dir: str | Path,
    store_path: str | Path,
    out_dir: str | Path,
    count: int,
    strategy: str = "diverse",
    seed: int = 0,
    formats: Sequence[str] = (),
    show_progress: bool = True,
) -> Suggestion:
    """Ranks a store's finished images for labeling and writes, in `out_dir` (whole or not at all):
    `ranking.json` (every image's uncertainty and rank, the chosen ones in order, the strategy),
    `suggestions.png` (each chosen image, its predicted mask and uncertainty map), and for the
    chosen images the pre-annotations of `formats` at each image's own size: "png"
    (`<name>_labels.png` index masks), "coco" (`annotations.json`, file names `<name>.png`;
    `extract --coco` matches them to a folder's images by name).

    Raises:
        ValueError: a count below 1, an unknown strategy, or a store with no finished image.
        StoreMismatchError: the ensemble was trained on other features than the store holds.
    """
    if count < 1:
        raise ValueError(f"suggest: count must be at least 1, got {count}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    ensemble_dir, out_dir = Path(ensemble_dir), Path(out_dir)
    ensemble = load_ensemble(ensemble_dir)
    store = open_store_for_ensemble(ensemble, store_path, ensemble_dir)
    indices = [int(index) for index in np.flatnonzero(store.done_mask())]
    if not indices:
        raise ValueError(f"{store.path} holds no finished image to suggest from (run extract first)")
    # 1. Every image scored, and its pooled features kept for "diverse".
    uncertainty, embeddings = np.empty(len(indices)), []
    for position, index in enumerate(tqdm(indices, desc="suggest", unit="image", disable=not show_progress)):
        uncertainty[position] = predict_image(ensemble, store, index, PIXELS_PER_BATCH).uncertainty
        embeddings.append(pooled_features(store, index))
    chosen = choose_images(uncertainty, np.stack(embeddings), count, strategy, seed)
    names = [store.image_names[indices[position]] for position in chosen]
    # 2. The chosen images' pictures and pre-annotations, at each image's own size.
    classes = ClassInfo(ensemble.class_names, ensemble.ignore_label)
    coco = CocoBuilder(classes) if "coco" in formats else None
    rows = []
    with replaced_folder(out_dir) as staging:
        for position in chosen:
            index = indices[position]
            prediction = predict_image(ensemble, store, index, PIXELS_PER_BATCH)
            name = store.image_names[index]
            labels = resize_nearest(prediction.labels, store.schema.original_shape(index))
            if "png" in formats:
                save_index_png(staging / f"{name}_labels.png", labels)
            if coco is not None:
                coco.add(f"{name}.png", labels)
            rows.append({"image": store.image(index), "prediction": prediction.labels,
                         "uncertainty": prediction.disagreement, "title": f"{name}\n{uncertainty[position]:.3f}"})
        save_prediction_grid(staging / CONTACT_SHEET, rows, ensemble.class_names, ignore_label=None)
        if coco is not None:
            write_coco(staging / COCO_FILE, coco.coco)
        ranks = {int(position): rank for rank, position in enumerate(np.argsort(-uncertainty, kind="stable"), start=1)}
        ranking = {
            "strategy": strategy, "count": len(chosen), "seed": seed, "ensemble": str(ensemble_dir),
            "store": str(store.path), "uncertainty": "mean of the top 10 % of the members' Jensen–Shannon divergence",
            "chosen": names,
            "images": sorted(({"name": store.image_names[index], "uncertainty": round(float(uncertainty[position]), 6),
                               "uncertainty_rank": ranks[position], "chosen": position in chosen}
                              for position, index in enumerate(indices)), key=lambda row: row["uncertainty_rank"]),
        }
        (staging / RANKING_FILE).write_text(json.dumps(ranking, indent=1))
    return Suggestion(names, {store.image_names[index]: float(uncertainty[position])
                              for position, index in enumerate(indices)}, out_dir)


def pooled_features(store, index: int) -> np.ndarray:
    """An image's features averaged over its pixels, float64 (D,): each native table's mean
    (bilinear upsampling keeps a map's mean up to its border), or the dense pixels' mean."""
    if store.layout == "native":
        return np.concatenate([table.double().mean(dim=(1, 2)).numpy() for table in store.block_tables(index)])
    return store.image_features(index).astype(np.float64).mean(axis=(0, 1))
