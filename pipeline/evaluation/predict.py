"""Predicting a store's images with an ensemble: per-pixel labels, mean probabilities and disagreement.

`predict_image` predicts one stored image; `predict_store` (step 1 of the evaluation: predict →
score → report) predicts every finished image of a store into a predictions folder
(`pipeline.evaluation.predictions`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.evaluation.predictions import Predictions, create_predictions
from pipeline.heads.pixel_ensemble.ensemble import Ensemble, load_ensemble
from pipeline.heads.pixel_ensemble.inference import member_logits_from_tables, votes_and_disagreement
from pipeline.heads.segmenter.segmenter import load_segmenter
from pipeline.metrics import top_decile_mean
from pipeline.runtime.atomic import replaced_folder
from pipeline.runtime.devices import torch_threads
from pipeline.sizes import as_shape
from pipeline.store.reader import FeatureStore
from pipeline.store.schema import FeatureDescription, StoreMismatchError

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ImagePrediction:
    """One image's prediction: labels int64 (S, S) (the mode of the members' votes, as the
    paper), Jensen–Shannon map float32 (S, S), the members' mean softmax float32 (K, S, S)."""

    labels: np.ndarray
    disagreement: np.ndarray
    mean_probabilities: np.ndarray

    @property
    def uncertainty(self) -> float:
        return top_decile_mean(self.disagreement)


def open_store_for_ensemble(
    ensemble: Ensemble, store_path: str | Path, ensemble_dir: Path, cache_megabytes: int = 0
) -> FeatureStore:
    """The store's features an ensemble was trained on: its steps and taps of the store, read
    alone (a store may hold more, e.g. a superset extracted once for many selections).

    Raises:
        StoreMismatchError: the store lacks one of them, or holds another model's features.
    """
    return open_store_for_features(ensemble.features, store_path, ensemble_dir, "ensemble", cache_megabytes)


def open_store_for_features(
    features: FeatureDescription, store_path: str | Path, trained_dir: Path, kind: str, cache_megabytes: int = 0
) -> FeatureStore:
    """`features`' steps and taps of a store, for a head (`kind`: "ensemble", "refiner") saved in
    `trained_dir` that was trained on them; refused, naming what differs, if the store lacks them."""
    try:
        store = FeatureStore(store_path, cache_megabytes, features.steps, features.taps)
    except StoreMismatchError as error:
        raise StoreMismatchError(
            f"the {kind} in {trained_dir} was trained on steps {features.steps} and taps {features.taps}, "
            f"but {error} ({store_path}); extract those"
        ) from None
    differences = features.differences(store.feature_description())
    if differences:
        raise StoreMismatchError(
            f"the {kind} in {trained_dir} was trained on other features than {store.path} holds "
            f"({kind} vs store: {'; '.join(differences)}); extract the images with the {kind}'s checkpoint, "
            "steps and taps"
        )
    return store


@torch.inference_mode()
def predict_pixels(
    ensemble: Ensemble, pixel_features: Callable[[np.ndarray, np.ndarray], np.ndarray], size: int | Sequence[int],
    pixels_per_batch: int,
) -> ImagePrediction:
    """Predicts every pixel of an image, a band of rows at a time.

    Args:
        ensemble: the trained members.
        pixel_features: (ys, xs) → float32 (P, D) features of those pixels.
        size: the image size: S (S×S) or (H, W).
        pixels_per_batch: about how many pixels go through the ensemble at once.
    """
    height, width = as_shape(size)
    rows_per_band = max(1, pixels_per_batch // width)
    labels = np.empty((height, width), dtype=np.int64)
    disagreement = np.empty((height, width), dtype=np.float32)
    mean_probabilities = np.empty((ensemble.num_classes, height, width), dtype=np.float32)
    for top in range(0, height, rows_per_band):
        rows = np.arange(top, min(top + rows_per_band, height))
        ys, xs = np.repeat(rows, width), np.tile(np.arange(width), len(rows))  # the band's pixels, row-major
        features = torch.from_numpy(pixel_features(ys, xs))  # (P, D)
        logits = torch.stack([member(features) for member in ensemble.members])  # (M, P, K)
        band_labels, band_disagreement, band_probabilities = _prediction(logits)
        labels[rows] = band_labels.numpy().reshape(len(rows), width)
        disagreement[rows] = band_disagreement.numpy().reshape(len(rows), width)
        mean_probabilities[:, rows] = band_probabilities.numpy().T.reshape(-1, len(rows), width)  # (P, K) -> (K, rows, W)
    return ImagePrediction(labels, disagreement, mean_probabilities)


def predict_from_tables(ensemble: Ensemble, tables: list[torch.Tensor], size: int | Sequence[int]) -> ImagePrediction:
    """Predicts every pixel of an image of `size` (S: S×S, or (H, W)) from its block tables (per
    (step, block), (C_b, h_b, w_b)), each member's first layer at the blocks' own resolution."""
    height, width = as_shape(size)
    labels, disagreement, mean_probabilities = _prediction(member_logits_from_tables(ensemble.members, tables, size))
    # (H·W,) row-major -> (H, W); (H·W, K) -> (K, H, W)
    return ImagePrediction(
        labels.numpy().reshape(height, width),
        disagreement.numpy().reshape(height, width),
        mean_probabilities.numpy().T.reshape(-1, height, width),
    )


def _prediction(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labels int64 (P,), disagreement float32 (P,) and mean probabilities float32 (P, K) from
    the members' logits (M, P, K): the first two exactly as `votes_and_disagreement`."""
    labels, disagreement = votes_and_disagreement(logits)
    return labels, disagreement, logits.softmax(dim=2).mean(dim=0)


def predict_image(ensemble: Ensemble, store: FeatureStore, index: int, pixels_per_batch: int) -> ImagePrediction:
    """Predicts every pixel of one stored image (native stores: from the block tables at once;
    dense stores: a band of pixel vectors at a time)."""
    if store.layout == "native":
        return predict_from_tables(ensemble, store.block_tables(index), store.image_shape)
    return predict_pixels(
        ensemble, lambda ys, xs: store.pixel_features(index, ys, xs), store.image_shape, pixels_per_batch
    )


def predict_store(
    ensemble_dir: str | Path,
    store_path: str | Path,
    predictions_dir: str | Path,
    pixels_per_batch: int = 16384,
    threads: int = 0,
    show_progress: bool = True,
    images: Sequence[int] | None = None,
) -> Predictions:
    """Step 1 of the evaluation: predicts every finished image of a store into a predictions
    folder (`pipeline.evaluation.predictions`): the members' mean probabilities, their voted
    labels and their disagreement, one image at a time (memory does not grow with the store).

    The folder appears whole or not at all: it is written beside `predictions_dir` and renamed
    into place at the end, replacing what was there. `images`: these finished images only (store
    indices; None: all).

    Raises:
        StoreMismatchError: the ensemble was trained on other features than the store holds.
    """
    ensemble_dir = Path(ensemble_dir)
    ensemble = load_ensemble(ensemble_dir)
    # Each image is read once: no table cache, whose filling would grow with the test set.
    store = open_store_for_ensemble(ensemble, store_path, ensemble_dir)
    wanted = None if images is None else {int(index) for index in images}
    indices = [int(index) for index in np.flatnonzero(store.done_mask()) if wanted is None or index in wanted]
    provenance = {"ensemble": str(ensemble_dir), "store": str(store.path), "features": store.feature_description(),
                  "labels": "mode of the members' votes"}
    with replaced_folder(Path(predictions_dir)) as staging, torch_threads(threads):
        writer = create_predictions(
            staging, [store.image_names[index] for index in indices], ensemble.class_names, ensemble.ignore_label,
            store.image_shape, has_uncertainty=True, provenance=provenance,
        )
        for position, index in enumerate(tqdm(indices, desc="predict", unit="image", disable=not show_progress)):
            prediction = predict_image(ensemble, store, index, pixels_per_batch)
            writer.write(position, prediction.mean_probabilities, prediction.labels, prediction.disagreement)
    return Predictions(predictions_dir)


def predict_store_with_segmenter(
    segmenter_dir: str | Path,
    store_path: str | Path,
    predictions_dir: str | Path,
    threads: int = 0,
    show_progress: bool = True,
) -> Predictions:
    """`predict_store` for a segmenter (`pipeline.heads.segmenter`): it reads the store's images,
    not its features, so any store of the test images serves. The predictions hold its softmax
    and argmax labels (no ensemble: no disagreement).

    Raises:
        ValueError: the store's images have other classes than the segmenter was trained on
            (checked by name where the store records them).
    """
    segmenter_dir = Path(segmenter_dir)
    segmenter = load_segmenter(segmenter_dir)
    store = FeatureStore(store_path)
    recorded = store.schema.classes
    if recorded is not None and list(recorded["names"]) != segmenter.class_names:
        raise ValueError(
            f"the segmenter in {segmenter_dir} knows the classes {segmenter.class_names}, but {store_path} "
            f"holds images labeled with {list(recorded['names'])}"
        )
    indices = [int(index) for index in np.flatnonzero(store.done_mask())]
    provenance = {"segmenter": str(segmenter_dir), "store": str(store.path), "labels": "argmax of the segmenter's softmax"}
    with replaced_folder(Path(predictions_dir)) as staging, torch_threads(threads):
        writer = create_predictions(
            staging, [store.image_names[index] for index in indices], segmenter.class_names, segmenter.ignore_label,
            store.image_shape, has_uncertainty=False, provenance=provenance,
        )
        for position, index in enumerate(tqdm(indices, desc="predict", unit="image", disable=not show_progress)):
            image = store.image(index).astype(np.float32).transpose(2, 0, 1) / 127.5 - 1.0  # (H, W, 3) uint8 -> (3, H, W)
            probabilities = segmenter.probabilities(torch.from_numpy(image)[None])[0].numpy()  # (K, H, W)
            writer.write(position, probabilities, probabilities.argmax(axis=0), None)
    return Predictions(predictions_dir)
