"""Segmentation metrics accumulated over a whole test set, as the paper computes them.

Two definitions of per-class IoU are kept side by side; both sum intersections and unions
over all test images before dividing (IoU_k = Σ|P∩G| / Σ|P∪G|):

- "paper", the official implementation's: every pixel counts, so a prediction of class k on a
  pixel labeled with the ignore label enlarges k's union; a class absent from both prediction
  and ground truth scores 0 and still counts in the mean. Only the ignore label itself is left
  out of the mean. This is how the published numbers were computed.
- "ignore_excluded": pixels labeled with the ignore label count nowhere, and classes absent from
  both prediction and ground truth are left out of the mean.

On label maps without ignore-labeled pixels in which every class occurs, the two agree.
"""

from __future__ import annotations

import numpy as np

from pipeline.config import IoUDefinition


class IoUAccumulator:
    """Sums per-class intersections and unions over images.

    The ignore label may also be a class index (e.g. 0 in bedroom_28); that class is then
    never scored.

    Args:
        num_classes: K; labels are 0..K-1.
        ignore_label: the label of unannotated pixels.
    """

    def __init__(self, num_classes: int, ignore_label: int):
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        self.intersections = np.zeros(num_classes, dtype=np.int64)
        self.unions = np.zeros(num_classes, dtype=np.int64)  # over pixels not labeled ignore
        self.unions_all_pixels = np.zeros(num_classes, dtype=np.int64)  # over every pixel (the paper's)
        self.correct_pixels = 0
        self.scored_pixels = 0

    def update(self, predicted: np.ndarray, target: np.ndarray) -> None:
        """Adds one image: predicted and target int label maps of the same shape."""
        if predicted.shape != target.shape:
            raise ValueError(f"prediction shape {predicted.shape} differs from label shape {target.shape}")
        predicted, target = predicted.ravel().astype(np.int64), target.ravel().astype(np.int64)
        scored = target != self.ignore_label
        in_range = (predicted >= 0) & (predicted < self.num_classes)
        # Predictions on ignored pixels: counted in the paper's unions only.
        predicted_on_ignored = np.bincount(predicted[~scored & in_range], minlength=self.num_classes)
        predicted, target = predicted[scored], target[scored]
        both = np.bincount(target[predicted == target], minlength=self.num_classes)[: self.num_classes]
        predicted_counts = np.bincount(predicted[in_range[scored]], minlength=self.num_classes)
        target_counts = np.bincount(target, minlength=self.num_classes)[: self.num_classes]
        self.intersections += both
        self.unions += predicted_counts + target_counts - both
        self.unions_all_pixels += predicted_counts + target_counts - both + predicted_on_ignored
        self.correct_pixels += int((predicted == target).sum())
        self.scored_pixels += int(scored.sum())

    def scored_classes(self) -> np.ndarray:
        """Class indices that are scored (all but the ignore label)."""
        return np.array([k for k in range(self.num_classes) if k != self.ignore_label], dtype=np.int64)

    def per_class_iou(self, definition: IoUDefinition = "paper") -> np.ndarray:
        """float64 (K,): IoU per class; NaN for the ignore class. Under "paper" a class with an
        empty union scores 0 (as the official code's intersection / (1e-8 + union)); under
        "ignore_excluded" it is NaN."""
        unions = self.unions_all_pixels if definition == "paper" else self.unions
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = self.intersections / unions
        iou[unions == 0] = 0.0 if definition == "paper" else np.nan
        if 0 <= self.ignore_label < self.num_classes:
            iou[self.ignore_label] = np.nan
        return iou

    def mean_iou(self, definition: IoUDefinition = "paper") -> float:
        """Mean IoU over the scored classes (under "ignore_excluded": those that occur)."""
        iou = self.per_class_iou(definition)[self.scored_classes()]
        return float(np.nanmean(iou)) if not np.isnan(iou).all() else float("nan")

    def pixel_accuracy(self) -> float:
        """Correct pixels among those not labeled with the ignore label."""
        return self.correct_pixels / self.scored_pixels if self.scored_pixels else float("nan")


def top_decile_mean(values: np.ndarray) -> float:
    """Mean of the largest 10 % of values (the paper's per-image uncertainty score).

    As the official code: the top int(n / 10) values, and all of them when n < 10.
    """
    flat = np.sort(np.asarray(values, dtype=np.float64).ravel())
    count = int(len(flat) / 10)
    return float(flat[-count:].mean()) if count else float(flat.mean())
