"""Choosing a store's steps and taps from the labeled images alone (never the test split).

A cheap proxy stands in for the ensemble: a ridge classifier (one-vs-rest least squares on
standardised features, what sklearn's `StandardScaler` → `RidgeClassifier` computes) on a sample
of each training image's labeled pixels, scored by mIoU on held-out images with k-fold
cross-validation over images. `RidgeProbe` fits it from Gram blocks computed once per pair of
(step, tap) groups, so each of the hundreds of fits costs a d×d solve, not a pass over the pixels.

At a superset too wide for memory (the paper's ADM-256, every decoder block at 5 steps: 53,760
features per pixel) the probe fits on each group's leading principal components instead, read a
tap at a time (`probe_features`); `select_cost` says which probe, how much memory and how long
before anything is read.

1. Every single (step, tap) is scored alone: the per-candidate table and heat map.
2. Greedy forward selection on the store's grid (a selection is some steps × some taps, what
   `train --steps/--blocks` reads): from the best single (step, tap), add the step or the tap
   that raises the validation mIoU most, while it rises by more than `min_gain` (0.2 points by
   default) and the features stay within `max_features`.

The result is `selection_file.Selection`, written as the selection.json that `train --selection` reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pipeline.config import SelectSettings
from pipeline.data.folders import ClassInfo
from pipeline.heads.pixel_ensemble.sampling import select_labeled_pixels
from pipeline.heads.probe_features import (
    PROBE_FLOPS_PER_SECOND,
    READ_BYTES_PER_SECOND,
    exact_features,
    largest_tap_bytes,
    probe_bytes,
    read_bytes,
    reduced_dimensions,
    reduced_features,
    sample_pixels,
)
from pipeline.heads.selection_file import Selection, write_selection
from pipeline.metrics import IoUAccumulator
from pipeline.pictures.figures import save_selection_heatmap
from pipeline.store.reader import FeatureStore
from pipeline.store.schema import FeatureSelection, select_features


def select_into_folder(
    store_path: str | Path, out_dir: Path, settings: SelectSettings, classes: ClassInfo | None = None,
    show_progress: bool = True,
) -> Selection:
    """`select_steps_and_taps` with the store's classes (or `classes`), written to `out_dir` as
    `selection.json` (what `train --selection` reads) and `selection.png` (the heat map)."""
    store = FeatureStore(store_path, cache_megabytes=0)
    classes = store.class_info(classes)
    selection = select_steps_and_taps(
        store_path, classes.names, classes.ignore_label, settings.folds, settings.pixels_per_image,
        settings.min_gain_points / 100, settings.max_features, settings.seed, show_progress,
        settings.steps, settings.blocks, settings.memory_gigabytes, settings.components,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    write_selection(selection, out_dir / "selection.json")
    save_selection_heatmap(out_dir / "selection.png", store.schema.steps, store.schema.taps, selection.single,
                           (selection.steps, selection.taps))
    return selection


def select_steps_and_taps(
    store_path: str | Path,
    class_names: Sequence[str],
    ignore_label: int,
    folds: int = 5,
    pixels_per_image: int = 500,
    min_gain: float = 0.002,
    max_features: int | None = None,
    seed: int = 0,
    show_progress: bool = True,
    candidate_steps: Sequence[int] | None = None,
    candidate_blocks: Sequence[int | str] | None = None,
    memory_gigabytes: float = 4.0,
    components: int = 32,
    probe: str = "auto",
) -> Selection:
    """Chooses steps and taps of a store by cross-validating a ridge classifier over its labeled images.

    Args:
        min_gain: in mIoU (0.002 = 0.2 points).
        candidate_steps, candidate_blocks: choose among these of the store's steps and taps only
            (None: all); only their features are read and kept.
        memory_gigabytes, components, probe: "exact" fits the probe on every candidate feature,
            "reduced" on each (step, tap) group's `components` leading principal components
            (`probe_features`), "auto" the exact one where `select_cost` says it fits in
            `memory_gigabytes`, else the reduced one.

    Raises:
        ValueError: fewer than two labeled images (nothing to validate on).
    """
    store = FeatureStore(store_path, cache_megabytes=0)
    schema = store.schema
    candidates = select_features(schema, candidate_steps, candidate_blocks)
    candidate_steps, candidate_taps = candidates.steps, [shape.name for shape in candidates.tap_shapes]
    num_classes = len(class_names)
    pixels = select_labeled_pixels(store, num_classes, ignore_label, class_names=class_names)
    labeled_images = len(np.unique(pixels.image_index))
    if labeled_images < 2:
        raise ValueError(f"{store.path}: selection needs at least 2 labeled images to validate on, found {labeled_images}")
    sample = sample_pixels(pixels.image_index, pixels.y, pixels.x, pixels.label, folds, pixels_per_image,
                           np.random.default_rng(seed))
    if probe == "auto":  # decided on the bound `select_cost` says beforehand, so the two never disagree
        images = len(schema.image_names)
        probe = probe_cost(store, candidates, images, images * pixels_per_image, folds, memory_gigabytes, components)["probe"]
    if probe == "exact":
        features = exact_features(store_path, candidates, sample, show_progress)
    else:
        features = reduced_features(store_path, candidates, sample, components, show_progress)
    ridge = RidgeProbe(features.values, sample.labels, sample.fold, num_classes, ignore_label)
    for group, columns in features.group_columns.items():
        ridge.add_group(group, columns)
    del features  # the probe keeps its own float64 copy
    steps_of_store = candidate_steps or [None]

    def score(steps: list[int], taps: list[str]) -> tuple[float, np.ndarray]:
        return ridge.score([(step, tap) for step in (steps or [None]) for tap in taps])

    singles = [(step, tap) for step in steps_of_store for tap in candidate_taps]
    single, per_class = {}, {}
    for step, tap in tqdm(singles, desc="select: single", unit="candidate", disable=not show_progress):
        miou, class_iou = score([] if step is None else [step], [tap])
        single[_name(step, tap)], per_class[tap] = miou, np.fmax(per_class.get(tap, class_iou), class_iou)
    best_step, best_tap = max(singles, key=lambda candidate: single[_name(*candidate)])
    steps, taps = ([] if best_step is None else [best_step]), [best_tap]
    current = single[_name(best_step, best_tap)]
    order = [{"added": _name(best_step, best_tap), "miou": round(current, 4)}]
    while True:
        options = [(steps + [step], taps, f"step {step}") for step in candidate_steps if step not in steps]
        options += [(steps, taps + [tap], f"tap {tap}") for tap in candidate_taps if tap not in taps]
        options = [option for option in options if max_features is None
                   or select_features(schema, option[0] or None, option[1]).feature_dim <= max_features]
        if not options:
            break
        scored = [(score(option_steps, option_taps)[0], option_steps, option_taps, label)
                  for option_steps, option_taps, label in tqdm(options, desc="select: greedy", unit="option",
                                                               disable=not show_progress)]
        miou, best_steps, best_taps, label = max(scored, key=lambda row: row[0])
        if miou - current <= min_gain:
            break
        steps, taps, current = best_steps, best_taps, miou
        order.append({"added": label, "miou": round(miou, 4)})
    in_store_order = select_features(schema, steps or None, taps)
    class_best = {
        class_names[k]: max(per_class, key=lambda tap: per_class[tap][k])
        for k in range(num_classes) if k != ignore_label and any(not np.isnan(per_class[tap][k]) for tap in per_class)
    }
    return Selection(in_store_order.steps, in_store_order.taps, round(current, 4),
                     {name: round(value, 4) for name, value in single.items()}, order, class_best,
                     int(sample.fold.max()) + 1, pixels_per_image)


def select_cost(store_path: str | Path, settings: SelectSettings) -> dict:
    """What `select` expects to hold and take, said before it starts (`probe_cost` for every
    image of the store labeled, each giving its full sample of pixels)."""
    store = FeatureStore(store_path, cache_megabytes=0)
    candidates = select_features(store.schema, settings.steps, settings.blocks)
    images = len(store.schema.image_names)
    return probe_cost(store, candidates, images, images * settings.pixels_per_image, settings.folds,
                      settings.memory_gigabytes, settings.components)


def probe_cost(store: FeatureStore, candidates: FeatureSelection, images: int, pixels: int, folds: int,
               memory_gigabytes: float, components: int) -> dict:
    """The probe `select` uses and its cost: the exact probe where its memory (`probe_bytes`)
    fits in `memory_gigabytes`, else the reduced one (plus its widest tap's read). Seconds: the
    store's reads and the Gram rows of every group at this machine kind's rates; the greedy
    search's solves come on top (seconds where its options stay narrow).

    Returns:
        pixels, features_per_pixel (the candidates'), candidates ((step, tap) groups), probe
        ("exact" or "reduced"), probe_features (the columns it fits on), bytes, seconds.
    """
    dimensions = len(candidates.columns)
    probe, probe_dimensions, memory = "exact", dimensions, probe_bytes(pixels, dimensions, folds)
    if memory > memory_gigabytes * 1e9:
        probe_dimensions = reduced_dimensions(candidates, components)
        probe = "reduced"
        memory = probe_bytes(pixels, probe_dimensions, folds) + largest_tap_bytes(pixels, candidates)
    seconds = (read_bytes(store, candidates, images) / READ_BYTES_PER_SECOND
               + 2 * pixels * probe_dimensions ** 2 / PROBE_FLOPS_PER_SECOND)
    return {"pixels": pixels, "features_per_pixel": dimensions,
            "candidates": max(1, len(candidates.steps)) * len(candidates.tap_shapes),
            "probe": probe, "probe_features": probe_dimensions, "bytes": memory, "seconds": seconds}


def _name(step: int | None, tap: str) -> str:
    return tap if step is None else f"t{step} {tap}"


class RidgeProbe:
    """Cross-validated ridge classifiers on any union of column groups, from statistics computed once.

    Per fold: the pixel count, column sums, the ±1 class targets' sums and cross products, and
    (on a group's first use) the Gram rows of that group against every column; the training
    side of a fold is all folds minus that one. A fit on some groups then centres and
    standardises their Gram matrix and solves (C + alpha·I) W = b: the same classifier as
    `StandardScaler` → `RidgeClassifier(alpha)` fitted on the training folds' pixels (equal up to
    float rounding; a test compares them), for the cost of a d×d solve instead of a pass over the
    pixels. Memory: the features in float64 (8·P·D bytes) and 8·(folds + 1)·D bytes per column of
    the groups used, at most 8·(folds + 1)·D².

    Args:
        features: (P, D) of the sampled pixels; labels: (P,) in 0..num_classes-1; fold: (P,)
            each pixel's fold (its image's).
    """

    def __init__(self, features: np.ndarray, labels: np.ndarray, fold: np.ndarray, num_classes: int,
                 ignore_label: int, alpha: float = 1.0):
        # Shifting every column by a constant changes neither the scaler nor the ridge fit (both
        # centre the data), and keeps the Gram sums small where features sit far from 0.
        self.features = features.astype(np.float64) - features.mean(axis=0, dtype=np.float64)  # (P, D)
        self.labels, self.num_classes, self.ignore_label, self.alpha = labels, num_classes, ignore_label, alpha
        self.fold_rows = [np.flatnonzero(fold == held_out) for held_out in np.unique(fold)]
        self.columns: dict[object, np.ndarray] = {}
        targets = np.where(labels[:, None] == np.arange(num_classes), 1.0, -1.0)  # (P, K): RidgeClassifier's coding
        # Per-fold statistics, each with the sum over all folds appended as a last entry.
        self.count = self._with_total(np.array([len(rows) for rows in self.fold_rows], dtype=np.float64))  # (F+1,)
        self.class_count = self._with_total(np.stack([np.bincount(labels[rows], minlength=num_classes)
                                                      for rows in self.fold_rows]))  # (F+1, K)
        self.target_sum = self._with_total(np.stack([targets[rows].sum(axis=0) for rows in self.fold_rows]))
        self.sums = self._with_total(np.stack([self.features[rows].sum(axis=0) for rows in self.fold_rows]))  # (F+1, D)
        self.cross = self._with_total(np.stack([self.features[rows].T @ targets[rows] for rows in self.fold_rows]))  # (F+1, D, K)
        self.gram_rows: dict[object, np.ndarray] = {}  # group → (F+1, d, D): its columns × every column

    @staticmethod
    def _with_total(per_fold: np.ndarray) -> np.ndarray:
        return np.concatenate([per_fold, per_fold.sum(axis=0, keepdims=True)])

    def add_group(self, key: object, columns: np.ndarray) -> None:
        """Names some columns (a (step, tap)); `score` takes unions of named groups."""
        self.columns[key] = np.asarray(columns)

    def _rows(self, key: object) -> np.ndarray:
        if key not in self.gram_rows:
            block = self.features[:, self.columns[key]]
            self.gram_rows[key] = self._with_total(np.stack([block[rows].T @ self.features[rows] for rows in self.fold_rows]))
        return self.gram_rows[key]

    def score(self, groups: Sequence[object]) -> tuple[float, np.ndarray]:
        """mIoU over the folds' held-out pixels (IoU summed over all folds before dividing;
        classes absent from both prediction and truth left out), and per-class IoU."""
        columns = np.concatenate([self.columns[group] for group in groups])
        gram = np.concatenate([self._rows(group)[:, :, columns] for group in groups], axis=1)  # (F+1, d, d)
        accumulator = IoUAccumulator(self.num_classes, self.ignore_label)
        for held_out, rows in enumerate(self.fold_rows):
            def training(statistic: np.ndarray) -> np.ndarray:  # all folds but the held-out one
                return statistic[-1] - statistic[held_out]

            count = training(self.count)
            mean = training(self.sums[:, columns]) / count
            target_mean = training(self.target_sum) / count  # (K,)
            centred = training(gram) - count * np.outer(mean, mean)  # (d, d)
            scale = np.sqrt(np.clip(np.diag(centred) / count, 0.0, None))
            scale[scale < 10 * np.finfo(np.float64).eps] = 1.0  # as StandardScaler: a constant column stays as it is
            system = centred / np.outer(scale, scale) + self.alpha * np.eye(len(scale))
            right = (training(self.cross[:, columns]) - count * np.outer(mean, target_mean)) / scale[:, None]  # (d, K)
            weights = np.linalg.solve(system, right)
            decision = ((self.features[np.ix_(rows, columns)] - mean) / scale) @ weights + target_mean  # (n, K)
            decision[:, training(self.class_count) == 0] = -np.inf  # classes the training folds lack
            accumulator.update(decision.argmax(axis=1), self.labels[rows])
        return accumulator.mean_iou("ignore_excluded"), accumulator.per_class_iou("ignore_excluded")
