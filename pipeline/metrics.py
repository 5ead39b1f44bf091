"""Segmentation metrics accumulated over a whole test set, as the paper computes them."""

from __future__ import annotations

import numpy as np


class IoUAccumulator:
    """Sums per-class intersections and unions over images: IoU_k = Σ|P∩G| / Σ|P∪G|.

    Pixels whose ground truth is the ignore label count nowhere. The ignore label may also be
    a class index (e.g. 0 in bedroom_28); that class is then never scored.

    Args:
        num_classes: K; labels are 0..K-1.
        ignore_label: the label of unannotated pixels.
    """

    def __init__(self, num_classes: int, ignore_label: int):
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        self.intersections = np.zeros(num_classes, dtype=np.int64)
        self.unions = np.zeros(num_classes, dtype=np.int64)
        self.correct_pixels = 0
        self.scored_pixels = 0

    def update(self, predicted: np.ndarray, target: np.ndarray) -> None:
        """Adds one image: predicted and target int label maps of the same shape."""
        if predicted.shape != target.shape:
            raise ValueError(f"prediction shape {predicted.shape} differs from label shape {target.shape}")
        scored = target != self.ignore_label
        predicted, target = predicted[scored].astype(np.int64), target[scored].astype(np.int64)
        both = np.bincount(target[predicted == target], minlength=self.num_classes)[: self.num_classes]
        predicted_counts = np.bincount(predicted, minlength=self.num_classes)[: self.num_classes]
        target_counts = np.bincount(target, minlength=self.num_classes)[: self.num_classes]
        self.intersections += both
        self.unions += predicted_counts + target_counts - both
        self.correct_pixels += int((predicted == target).sum())
        self.scored_pixels += int(scored.sum())

    def scored_classes(self) -> np.ndarray:
        """Class indices that are scored (all but the ignore label)."""
        return np.array([k for k in range(self.num_classes) if k != self.ignore_label], dtype=np.int64)

    def per_class_iou(self) -> np.ndarray:
        """float64 (K,): IoU per class; NaN for the ignore class and classes never seen in
        ground truth or prediction."""
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = self.intersections / self.unions
        iou[self.unions == 0] = np.nan
        if 0 <= self.ignore_label < self.num_classes:
            iou[self.ignore_label] = np.nan
        return iou

    def mean_iou(self) -> float:
        """Mean IoU over the scored classes that occur in ground truth or prediction."""
        iou = self.per_class_iou()[self.scored_classes()]
        return float(np.nanmean(iou)) if not np.isnan(iou).all() else float("nan")

    def pixel_accuracy(self) -> float:
        return self.correct_pixels / self.scored_pixels if self.scored_pixels else float("nan")


def top_decile_mean(values: np.ndarray) -> float:
    """Mean of the largest 10 % of values (the paper's per-image uncertainty score)."""
    flat = np.sort(np.asarray(values, dtype=np.float64).ravel())
    count = max(int(len(flat) / 10), 1)
    return float(flat[-count:].mean())
