"""Target 7: evaluation streams test images; its peak memory does not depend on their number.

A fresh process runs the evaluate stage (`evaluate_on_store`: predictions, masks, overlays,
metrics) on synthetic test stores of 20 and 650 images at adm-tiny's shapes at 64×64 (1056
features per pixel, 15 classes) and reports peak RSS and images/s. Throughput at the paper's
shape (256×256, 8448 features, 34 classes, 10 members) is timed on one image.

    python -m bench.evaluation_streaming [--quick]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from bench.common import (
    PAPER_CLASSES,
    PAPER_SIZE,
    PAPER_STEPS,
    PAPER_TAP_SHAPES,
    TINY_SIZE,
    TINY_STEPS,
    TINY_TAP_SHAPES,
    child_benchmark_main,
    current_rss_bytes,
    peak_rss_bytes,
    run_child,
    write_synthetic_store,
)
from pipeline.sources.base import TapShape

# adm-tiny's blocks 5, 6, 7, 8, 12 for a 64×64 input.
ADM_TINY_64 = [TapShape("adm.5", 128, 8, 8), TapShape("adm.6", 64, 8, 8), TapShape("adm.7", 64, 8, 8),
               TapShape("adm.8", 64, 16, 16), TapShape("adm.12", 32, 32, 32)]


def child(arguments: dict) -> dict:
    from pipeline.config import EvaluateSettings
    from pipeline.evaluation.evaluate import evaluate_on_store

    baseline = current_rss_bytes()
    started = time.perf_counter()
    metrics = evaluate_on_store(arguments["ensemble"], arguments["store"], arguments["out"],
                                EvaluateSettings(threads=1), show_progress=False)
    seconds = time.perf_counter() - started
    return {"baseline_rss_bytes": baseline, "peak_rss_bytes": peak_rss_bytes(), "seconds": round(seconds, 2),
            "images_per_second": round(metrics["images"] / seconds, 3), "images": metrics["images"]}


def train_small_ensemble(scratch: Path, shape: tuple, name: str) -> Path:
    from pipeline.config import TrainSettings
    from pipeline.heads.pixel_ensemble.training import train_on_store

    size, blocks, steps, classes = shape
    store = write_synthetic_store(scratch / f"{name}-train.zarr", "native", 2, size, blocks, steps, classes, seed=99)
    settings = TrainSettings(protocol="fast", fast_epochs=0.5, device="cpu", threads=1)
    train_on_store(store, scratch / f"{name}-ensemble", settings, show_progress=False)
    return scratch / f"{name}-ensemble"


def paper_shape_pixels_per_second(scratch: Path) -> dict:
    import torch

    from pipeline.evaluation.predict import predict_image
    from pipeline.heads.pixel_ensemble.ensemble import load_ensemble
    from pipeline.store.reader import FeatureStore

    torch.set_num_threads(1)
    shape = (PAPER_SIZE, PAPER_TAP_SHAPES, PAPER_STEPS, PAPER_CLASSES)
    ensemble = load_ensemble(train_small_ensemble(scratch, shape, "eval-paper"))
    store = FeatureStore(write_synthetic_store(scratch / "eval-paper-test.zarr", "native", 1, *shape))
    started = time.perf_counter()
    predict_image(ensemble, store, 0, 16384)
    seconds = time.perf_counter() - started
    return {"seconds_per_image": round(seconds, 2), "pixels_per_second": round(PAPER_SIZE**2 / seconds, 1)}


def run(quick: bool, scratch: Path) -> dict:
    if quick:
        shape, counts = (TINY_SIZE, TINY_TAP_SHAPES, TINY_STEPS, 3), [3, 12]
    else:
        shape, counts = (64, ADM_TINY_64, PAPER_STEPS, 15), [20, 650]
    ensemble = train_small_ensemble(scratch, shape, "eval")
    rows = []
    for count in counts:
        store = write_synthetic_store(scratch / f"eval-test-{count}.zarr", "native", count, *shape, seed=count)
        measured = run_child("bench.evaluation_streaming",
                             {"ensemble": str(ensemble), "store": str(store), "out": str(scratch / f"eval-out-{count}")})
        rows.append({"test_images": count, **measured})
        print(json.dumps(rows[-1]), flush=True)
    growth = rows[-1]["peak_rss_bytes"] / rows[0]["peak_rss_bytes"] - 1
    result = {
        "what": "peak RSS and throughput of the evaluate stage vs test-set size",
        "shape": {"size": shape[0], "feature_dim": len(shape[2]) * sum(b.channels for b in shape[1]), "classes": shape[3]},
        "rows": rows,
        "peak_growth": round(growth, 4),
        "targets": {"peak memory independent of test-set size (growth < 10 %)": growth < 0.10},
    }
    if not quick:
        result["paper_shape"] = paper_shape_pixels_per_second(scratch)
    return result


def main() -> None:
    child_benchmark_main("evaluation_streaming", __doc__, run, child)


if __name__ == "__main__":
    main()
