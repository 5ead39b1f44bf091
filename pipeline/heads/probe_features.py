"""The features `select`'s probe sees: the sampled labeled pixels' candidate features, exact
where they fit in memory, else reduced per (step, tap) group, in memory bounded by one tap.

At the paper's scale (all 18 decoder blocks of ADM-256 × 5 steps = 53,760 features per pixel,
20 labeled images × 500 pixels) the exact probe would hold 4.3 GB of float64 pixels and up to
8·(folds + 1)·D² = 139 GB of Gram rows. The reduced probe instead:

- reads the store one tap at a time (a native store reads only that tap's array), so the raw
  features in memory are one tap's columns of the sampled pixels (P × steps × C float32);
- standardises each (step, tap) group over the sampled pixels and keeps its `components`
  leading principal components (the whole standardised group where it is no wider); the probe
  then standardises those per training fold as it does any column (so the components are
  whitened). PCA rather than random projections: the leading directions are where a group's
  variance is, and a random projection needs more columns for the same fidelity;
- stores the result in float32 (the probe accumulates in float64).

The probe's matrix is then P × (groups × components): 10,000 × 2,880 for the paper's superset at 32
components, 0.1 GB, and its Gram rows at most 8·(folds + 1)·2,880² = 0.4 GB, and each greedy fit
a solve of at most 2,880 unknowns.

What it costs in quality (bench/results/select_scale.json, the demo's superset, where the exact
probe fits and `select` uses it): the reduced probe's choice, scored by the exact probe, against
the exact probe's own choice. A truncated probe is a noisier judge of wide unions; where the
exact probe fits, `select` uses it (`select_cost`), so a selection that fits is never changed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pipeline.store.reader import FeatureStore
from pipeline.store.schema import FeatureSelection

# Rough rates of this kind of machine (2-core CPU, local disk; bench/results/select_scale.json),
# for the time `select` says it expects before it starts.
READ_BYTES_PER_SECOND = 150e6  # stored features read and interpolated at the sampled pixels
PROBE_FLOPS_PER_SECOND = 10e9  # float64 matrix products on two cores


@dataclasses.dataclass(frozen=True)
class PixelSample:
    """The probe's pixels: per labeled image its sampled pixels, and every pixel's label and fold.

    Attributes:
        images: the labeled images' store indices.
        ys, xs: per image in `images`, its sampled pixels' coordinates.
        labels: (P,) int64, image by image in the order of `images`.
        fold: (P,) each pixel's cross-validation fold (its image's).
    """

    images: list[int]
    ys: list[np.ndarray]
    xs: list[np.ndarray]
    labels: np.ndarray
    fold: np.ndarray

    @property
    def count(self) -> int:
        return len(self.labels)


@dataclasses.dataclass(frozen=True)
class ProbeFeatures:
    """What the probe fits on: (P, D') features and each (step, tap) group's columns in them."""

    values: np.ndarray
    group_columns: dict[tuple[int | None, str], np.ndarray]


def probe_bytes(pixels: int, dimensions: int, folds: int) -> int:
    """Memory of the probe on `dimensions` columns: the features read in float32 and copied to
    float64 (12·P·D), and Gram rows if every group is used (8·(folds + 1)·D²)."""
    return 12 * pixels * dimensions + 8 * (folds + 1) * dimensions ** 2


def reduced_dimensions(candidates: FeatureSelection, components: int) -> int:
    """Columns of the reduced probe: per (step, tap) group, its channels or `components`, whichever is fewer."""
    return max(1, len(candidates.steps)) * sum(min(shape.channels, components) for shape in candidates.tap_shapes)


def largest_tap_bytes(pixels: int, candidates: FeatureSelection) -> int:
    """The reduced probe's raw read: one tap's columns of every sampled pixel, float32, plus a
    group's float64 standardised copy."""
    steps = max(1, len(candidates.steps))
    widest = max(shape.channels for shape in candidates.tap_shapes)
    return 4 * pixels * steps * widest + 16 * pixels * widest


def read_bytes(store: FeatureStore, candidates: FeatureSelection, images: int) -> int:
    """Stored bytes the probe's reads decode: the candidate taps of `images` images (native), or
    every tile of them (dense: each tap's pass reads the whole pixel vectors)."""
    steps = max(1, len(candidates.steps))
    if store.layout == "native":
        return images * 2 * sum(steps * shape.channels * shape.height * shape.width for shape in candidates.tap_shapes)
    height, width = store.image_shape
    return images * 2 * height * width * store.feature_dim * len(candidates.tap_shapes)


def exact_features(store_path: str | Path, candidates: FeatureSelection, sample: PixelSample,
                   show_progress: bool) -> ProbeFeatures:
    """Every candidate column of every sampled pixel, float32 (P, D), read image by image."""
    store = FeatureStore(store_path, cache_megabytes=0, steps=candidates.steps or None,
                         taps=[shape.name for shape in candidates.tap_shapes])
    values = np.concatenate([
        store.pixel_features(image, ys, xs)
        for image, ys, xs in tqdm(list(zip(sample.images, sample.ys, sample.xs)), desc="select: read",
                                  unit="image", disable=not show_progress)
    ])  # (P, D) float32, image by image
    groups, column = {}, 0
    for step in candidates.steps or [None]:  # the store's feature order: step-major, then tap
        for shape in candidates.tap_shapes:
            groups[step, shape.name] = np.arange(column, column + shape.channels)
            column += shape.channels
    return ProbeFeatures(values, groups)


def reduced_features(store_path: str | Path, candidates: FeatureSelection, sample: PixelSample, components: int,
                     show_progress: bool) -> ProbeFeatures:
    """Per (step, tap) group, the standardised group's `components` leading principal components
    (the whole standardised group where it has no more channels), float32 (P, D'). The store is
    read one tap at a time, so memory is bounded by the widest tap, not the superset's width."""
    steps = candidates.steps or [None]
    values = np.empty((sample.count, reduced_dimensions(candidates, components)), dtype=np.float32)
    groups, column = {}, 0
    for shape in tqdm(candidates.tap_shapes, desc="select: read and reduce", unit="tap", disable=not show_progress):
        store = FeatureStore(store_path, cache_megabytes=0, steps=candidates.steps or None, taps=[shape.name])
        tap = np.concatenate([store.pixel_features(image, ys, xs)
                              for image, ys, xs in zip(sample.images, sample.ys, sample.xs)])  # (P, steps·C), step-major
        for position, step in enumerate(steps):
            reduced = leading_components(tap[:, position * shape.channels:(position + 1) * shape.channels], components)
            groups[step, shape.name] = np.arange(column, column + reduced.shape[1])
            values[:, groups[step, shape.name]] = reduced
            column += reduced.shape[1]
        del tap
    return ProbeFeatures(values, groups)


def leading_components(group: np.ndarray, components: int) -> np.ndarray:
    """(P, C) → (P, min(C, components)): the standardised columns (a constant column stays 0),
    projected on their leading principal components when there are more than `components`."""
    standardised = group.astype(np.float64) - group.mean(axis=0, dtype=np.float64)  # (P, C)
    scale = standardised.std(axis=0)
    standardised /= np.where(scale < 10 * np.finfo(np.float64).eps, 1.0, scale)
    if group.shape[1] <= components:
        return standardised.astype(np.float32)
    _, vectors = np.linalg.eigh(standardised.T @ standardised)  # ascending eigenvalues
    return (standardised @ vectors[:, ::-1][:, :components]).astype(np.float32)  # (P, components)


def sample_pixels(image_index: np.ndarray, ys: np.ndarray, xs: np.ndarray, labels: np.ndarray, folds: int,
                  pixels_per_image: int, rng: np.random.Generator) -> PixelSample:
    """Up to `pixels_per_image` of each image's labeled pixels, and the images dealt into folds."""
    images = [int(image) for image in np.unique(image_index)]
    chosen = [rng.permutation(np.flatnonzero(image_index == image))[:pixels_per_image] for image in images]
    fold_of_image = {image: position % min(folds, len(images)) for position, image in enumerate(rng.permutation(images))}
    return PixelSample(
        images=images, ys=[ys[rows] for rows in chosen], xs=[xs[rows] for rows in chosen],
        labels=np.concatenate([labels[rows] for rows in chosen]).astype(np.int64),
        fold=np.concatenate([np.full(len(rows), fold_of_image[image]) for image, rows in zip(images, chosen)]),
    )

