"""Few-shot scores (DiffewS, as HSNet computes them): per-class foreground IoU and FB-IoU.

Each episode scores a binary prediction against the query's binary mask of the episode's
class, over the query's pixels not labeled with the ignore label. Its foreground and background
intersections and unions are added to its class's sums; after all episodes

- a class's IoU is its summed foreground intersection over its summed foreground union (0 when
  the union is empty, as the official intersection / max(union, 1)), and mIoU is the mean over
  the fold's classes, every class counted (one never drawn scores 0, as in the official code);
- FB-IoU is the mean of the background IoU and the foreground IoU, each its intersections
  summed over all classes and episodes over its unions so summed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

BACKGROUND_ROW, FOREGROUND_ROW = 0, 1


class FewShotScores:
    """Sums, per class of a fold, the foreground and background intersections and unions.

    Args:
        classes: the fold's classes (`ClassFold.test_classes`), label indices.
        names: the dataset's class names, indexed by label (`ClassInfo.names`); None names each
            class by its index.

    Raises:
        ValueError: no class, a repeated class, or two of the fold's classes with one name.
    """

    def __init__(self, classes: Sequence[int], names: Sequence[str] | None = None):
        self.classes = tuple(int(label) for label in classes)
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be one or more distinct label indices, got {list(self.classes)}")
        self.names = tuple(str(names[label]) if names is not None else str(label) for label in self.classes)
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"the fold's classes must have distinct names, got {list(self.names)}")
        self._positions = {label: position for position, label in enumerate(self.classes)}
        self.intersections = np.zeros((2, len(self.classes)), dtype=np.int64)  # rows: background, foreground
        self.unions = np.zeros((2, len(self.classes)), dtype=np.int64)
        self.episodes = np.zeros(len(self.classes), dtype=np.int64)  # episodes scored per class

    def update(
        self,
        class_index: int,
        predicted: np.ndarray | torch.Tensor,
        target: np.ndarray | torch.Tensor,
        scored: np.ndarray | torch.Tensor | None = None,
    ) -> None:
        """Adds one episode.

        Args:
            class_index: the episode's class, one of the fold's.
            predicted: bool (H, W), the predicted foreground (`masks.decode_masks`, one image).
            target: bool (H, W), the query's mask of the class (`EpisodeInputs.query_mask`).
            scored: bool (H, W), the pixels to score (`EpisodeInputs.query_scored`); None: all.

        Raises:
            ValueError: a class not of the fold, masks that are not binary, or shapes that differ.
        """
        if class_index not in self._positions:
            raise ValueError(f"class {class_index} is not one of the fold's classes {list(self.classes)}")
        predicted, target = _binary(predicted, "predicted"), _binary(target, "target")
        scored = np.ones_like(target) if scored is None else _binary(scored, "scored")
        if predicted.ndim != 2 or predicted.shape != target.shape or scored.shape != target.shape:
            raise ValueError(
                f"predicted, target and scored must be one (H, W) shape, got {predicted.shape}, {target.shape} "
                f"and {scored.shape}"
            )
        predicted, target = predicted[scored], target[scored]  # ignore-labeled pixels count nowhere
        position = self._positions[class_index]
        for row, (prediction, truth) in enumerate(((~predicted, ~target), (predicted, target))):
            self.intersections[row, position] += int((prediction & truth).sum())
            self.unions[row, position] += int((prediction | truth).sum())
        self.episodes[position] += 1

    def per_class_iou(self) -> np.ndarray:
        """float64 (K,): each fold class's foreground IoU, in `classes` order (0 for an empty union)."""
        return self.intersections[FOREGROUND_ROW] / np.maximum(self.unions[FOREGROUND_ROW], 1)

    def mean_iou(self) -> float:
        """Mean foreground IoU over the fold's classes."""
        return float(self.per_class_iou().mean())

    def fb_iou(self) -> float:
        """Mean of the background and foreground IoU, each summed over all classes and episodes."""
        return float((self.intersections.sum(axis=1) / np.maximum(self.unions.sum(axis=1), 1)).mean())

    def summary(self) -> dict:
        """A JSON-serialisable record: miou, fb_iou, per_class_iou and episodes_per_class by class
        name, episodes (IoUs as fractions in [0, 1]).

        Raises:
            ValueError: when no episode has been scored.
        """
        total = int(self.episodes.sum())
        if total == 0:
            raise ValueError("no episode has been scored: nothing to summarise")
        never = [name for name, count in zip(self.names, self.episodes, strict=True) if count == 0]
        if never:
            logger.warning("classes %s had no episode: each scores 0 in the mIoU (as the official code)", never)
        return {
            "miou": self.mean_iou(),
            "fb_iou": self.fb_iou(),
            "per_class_iou": dict(zip(self.names, map(float, self.per_class_iou()), strict=True)),
            "episodes_per_class": dict(zip(self.names, map(int, self.episodes), strict=True)),
            "episodes": total,
        }


def _binary(mask: np.ndarray | torch.Tensor, what: str) -> np.ndarray:
    """A mask as a bool numpy array; numbers must be 0 or 1."""
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        if not np.isin(mask, (0, 1)).all():
            raise ValueError(f"{what} must be a binary mask, found values {np.unique(mask)[:10].tolist()}")
        mask = mask.astype(bool)
    return mask
