"""Inference from native block tables: each member's first layer at the blocks' own resolution.

Today's path gathers every pixel's full feature vector (the blocks upsampled to the image
size: 8448 values per pixel at the paper's shape) and runs the members on it; the new path
(`predict_from_block_tables`) applies each member's first layer to every block at its own
resolution and upsamples the result (W·up(f) = Σ_b up(W_b·f_b)). Both run side by side here,
one thread, on the same images, and their outputs are compared:

- paper shape: 256×256, blocks 5, 6, 7, 8, 12 at steps 50/150/250 (8448 features), 34 classes,
  10 members, synthetic activations; seconds per image of both paths;
- cat_15 (from ../shared) at 64×64 with adm-tiny's features (random weights): labels of both
  paths on its 20 test images, and the largest disagreement difference. Skipped when ../shared
  is absent.

    python -m bench.inference_speed [--quick]
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import (
    PAPER_CLASSES,
    PAPER_SIZE,
    PAPER_STEPS,
    PAPER_TAP_SHAPES,
    TINY_SIZE,
    TINY_STEPS,
    TINY_TAP_SHAPES,
    command_line,
    write_result,
    write_synthetic_store,
)
from bench.evaluation_streaming import train_small_ensemble
from bench.training_speed import ADM_TINY, CAT, cat_stores
from pipeline.evaluation.predict import ImagePrediction, predict_from_tables, predict_pixels
from pipeline.heads.pixel_ensemble.ensemble import Ensemble, load_ensemble
from pipeline.store.reader import FeatureStore


def both_paths(ensemble: Ensemble, store: FeatureStore, index: int) -> tuple[ImagePrediction, float, ImagePrediction, float]:
    """(upsampled-features prediction, its seconds, block-table prediction, its seconds) of one image."""
    started = time.perf_counter()
    features_path = predict_pixels(ensemble, lambda ys, xs: store.pixel_features(index, ys, xs), store.image_size, 16384)
    features_seconds = time.perf_counter() - started
    started = time.perf_counter()
    tables_path = predict_from_tables(ensemble, store.block_tables(index), store.image_size)
    tables_seconds = time.perf_counter() - started
    return features_path, features_seconds, tables_path, tables_seconds


def compare(ensemble: Ensemble, store: FeatureStore, repeats: int = 1) -> dict:
    """Both paths on every image of a store (the first one `repeats` times): speed and agreement."""
    feature_seconds, table_seconds, differing, largest_gap = [], [], 0, 0.0
    for index in range(len(store.image_names)):
        for _ in range(repeats if index == 0 else 1):
            old, old_seconds, new, new_seconds = both_paths(ensemble, store, index)
            feature_seconds.append(old_seconds)
            table_seconds.append(new_seconds)
        differing += int((old.labels != new.labels).sum())
        largest_gap = max(largest_gap, float(np.abs(old.disagreement - new.disagreement).max()))
    old_median, new_median = statistics.median(feature_seconds), statistics.median(table_seconds)
    return {
        "images": len(store.image_names),
        "seconds_per_image_upsampled_features": round(old_median, 3),
        "seconds_per_image_block_tables": round(new_median, 3),
        "speedup": round(old_median / new_median, 2),
        "pixels_with_other_labels": differing,
        "largest_disagreement_difference": largest_gap,
    }


def run(quick: bool, scratch: Path) -> dict:
    from pipeline.config import TrainSettings
    from pipeline.heads.pixel_ensemble.training import train_on_store

    torch.set_num_threads(1)
    result = {"what": "evaluate/predict from upsampled feature vectors vs from native block tables (first layer at native resolution)"}
    shape = (TINY_SIZE, TINY_TAP_SHAPES, TINY_STEPS, 3) if quick else (PAPER_SIZE, PAPER_TAP_SHAPES, PAPER_STEPS, PAPER_CLASSES)
    ensemble = load_ensemble(train_small_ensemble(scratch, shape, "infer"))
    store = FeatureStore(write_synthetic_store(scratch / "infer-test.zarr", "native", 1, *shape))
    paper = compare(ensemble, store, repeats=3)
    paper["targets"] = {"speedup >= 6": paper["speedup"] >= 6, "labels identical": paper["pixels_with_other_labels"] == 0}
    result["paper shape (8448-d, 256², 34 classes, 10 members)" if not quick else "tiny shape"] = paper
    print(json.dumps(paper), flush=True)
    if quick:
        result["cat_15"] = "skipped: --quick"
    elif CAT.is_dir() and ADM_TINY.is_file():
        train, test = cat_stores(scratch, size=64)
        fast = TrainSettings(protocol="fast", device="cpu", threads=1)  # the members' protocol does not matter here
        train_on_store(train, scratch / "infer-cat-ensemble", fast, show_progress=False)
        cat = compare(load_ensemble(scratch / "infer-cat-ensemble"), FeatureStore(test))
        cat["targets"] = {"labels identical": cat["pixels_with_other_labels"] == 0,
                          "disagreement within 1e-3": cat["largest_disagreement_difference"] <= 1e-3}
        result["cat_15 (64x64, adm-tiny random weights)"] = cat
        print(json.dumps(cat), flush=True)
    else:
        result["cat_15"] = f"skipped: {CAT} or {ADM_TINY} is absent"
    return result


def main() -> None:
    arguments, scratch = command_line(__doc__)
    print(write_result("inference_speed", run(arguments.quick, scratch)))


if __name__ == "__main__":
    main()
