"""Refinement vs the ensemble's own prediction, per image, side by side in one run (one thread).

Paper shape: 256×256, blocks 5, 6, 7, 8, 12 at steps 50/150/250 (8448 features, native store),
34 classes, 10 members; the refiner at its default size (16 feature components, width 32, the
default 3-step schedule) with random weights: its cost does not depend on what it learned. The
ensemble's time is reading the image's block tables and predicting from them (what `evaluate`
does per image); the refiner's is reading them again, projecting, and its denoising steps.

    python -m bench --only refine_speed [--quick]
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
from pipeline.config import RefineSettings
from pipeline.evaluation.predict import predict_from_tables
from pipeline.heads.pixel_ensemble.ensemble import load_ensemble
from pipeline.refine.conditioning import FeatureProjection, conditioning
from pipeline.refine.denoiser import MaskDenoiser
from pipeline.refine.mask_diffusion import MaskDiffusion
from pipeline.refine.refining import Refiner, refine_image
from pipeline.store.reader import FeatureStore


def run(quick: bool, scratch: Path) -> dict:
    torch.set_num_threads(1)
    shape = (TINY_SIZE, TINY_TAP_SHAPES, TINY_STEPS, 3) if quick else (PAPER_SIZE, PAPER_TAP_SHAPES, PAPER_STEPS, PAPER_CLASSES)
    size, classes = shape[0], shape[3]
    ensemble = load_ensemble(train_small_ensemble(scratch, shape, "refine"))
    store = FeatureStore(write_synthetic_store(scratch / "refine-test.zarr", "native", 1, *shape))
    settings = RefineSettings()
    rng = np.random.default_rng(0)
    projection = FeatureProjection(rng.standard_normal((settings.projection_dims, store.feature_dim)).astype(np.float32),
                                   np.zeros(settings.projection_dims, np.float32))
    torch.manual_seed(0)
    model = MaskDenoiser(classes + settings.projection_dims, classes, settings.diffusion_steps, settings.width).eval()
    refiner = Refiner(model, MaskDiffusion(classes, settings.diffusion_steps), projection, ensemble.class_names,
                      ensemble.ignore_label, ensemble.features)
    ensemble_seconds, refine_seconds = [], []
    for _ in range(3):
        started = time.perf_counter()
        prediction = predict_from_tables(ensemble, store.block_tables(0), size)
        ensemble_seconds.append(time.perf_counter() - started)
        started = time.perf_counter()
        condition = conditioning(prediction.mean_probabilities, projection.project_image(store, 0))
        refine_image(refiner, condition, prediction.labels, settings.schedule, torch.Generator().manual_seed(0))
        refine_seconds.append(time.perf_counter() - started)
    ensemble_median, refine_median = statistics.median(ensemble_seconds), statistics.median(refine_seconds)
    result = {
        "what": "seconds per image: refinement (projection + denoising steps) vs the ensemble's prediction",
        "shape": f"{size}², {store.feature_dim} features, {classes} classes, {len(ensemble.members)} members",
        "schedule": settings.schedule,
        "seconds_per_image_ensemble": round(ensemble_median, 3),
        "seconds_per_image_refine": round(refine_median, 3),
        "refine_vs_ensemble": round(refine_median / ensemble_median, 2),
    }
    result["targets"] = {"refinement <= the ensemble's prediction": result["refine_vs_ensemble"] <= 1.0}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    arguments, scratch = command_line(__doc__)
    print(write_result("refine_speed", run(arguments.quick, scratch)))


if __name__ == "__main__":
    main()
