"""Target 2: the train stage's peak memory stays flat as the training set grows.

Synthetic native stores at the paper's shapes (256×256 images, 8448 features per pixel,
34 classes, every pixel labeled) with 5, 10, 20 and 40 images; for each, a fresh process runs
`train_on_store` with the default settings (fast protocol) and reports its peak RSS. It trains
into the second buffer, so the first buffer has been released, the second is in use and the
third is being gathered: the steady state of a long run. The official implementation's figure
is computed the way it allocates: every training pixel's 8448 features as float32 in RAM.

"Held by choice" is what the settings size on purpose, independent of the number of images:
two float16 buffers (the one being consumed and the one being gathered), the table cache as
filled at the end, the ensemble's parameters, gradients and Adam moments, one fused batch
(float32 plus its float16 gather), and the list of training pixels itself (10 bytes per pixel
plus a 4-byte epoch order: 37 MB for 2.6 M pixels, against 33.8 KB per pixel for float32
features). The rest (the interpreter and libraries, tables being read outside the cache,
allocator slack) must stay flat: its growth from the fewest to the most images is the "flat"
target. The growth without counting the pixel list as held is reported beside it.

    python -m bench.training_memory [--quick]
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

from bench.common import (
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

STEPS_PAST_FIRST_BUFFER = 4  # train into the second buffer: the third is being prefetched then


def child(arguments: dict) -> dict:
    """Trains on one store in this (fresh) process and reports its memory."""
    import pipeline.heads.pixel_ensemble.training as training_module
    from pipeline.config import TrainSettings
    from pipeline.heads.pixel_ensemble.training import train_on_store

    settings = TrainSettings(**arguments["settings"])
    seen = {}
    original_store = training_module.FeatureStore

    def remembering_store(*args, **kwargs):  # keep a handle on the store to read its cache size
        seen["store"] = original_store(*args, **kwargs)
        return seen["store"]

    training_module.FeatureStore = remembering_store
    baseline = current_rss_bytes()
    started = time.perf_counter()
    _, summary = train_on_store(arguments["store"], arguments["out"], settings, show_progress=False)
    return {
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak_rss_bytes(),
        "table_cache_bytes": seen["store"]._cache.bytes,
        "training_pixels": summary.training_pixels,
        "feature_dim": summary.feature_dim,
        "seconds": round(time.perf_counter() - started, 2),
    }


def model_state_bytes(feature_dim: int, num_classes: int, members: int) -> int:
    """Parameters, gradients and Adam's two moments of the ensemble, float32."""
    import torch

    from pipeline.heads.pixel_ensemble.ensemble import make_pixel_classifier

    member = make_pixel_classifier(feature_dim, num_classes, torch.Generator().manual_seed(0))
    return 4 * 4 * members * sum(parameter.numel() for parameter in member.parameters())


def official_bytes(images: int, size: int, feature_dim: int) -> int:
    """What the official code allocates: all pixels' features as float32."""
    return images * size * size * feature_dim * 4


def run(quick: bool, scratch: Path) -> dict:
    from pipeline.config import TrainSettings

    if quick:
        counts, shapes, size, steps, classes = [2, 4], TINY_TAP_SHAPES, TINY_SIZE, TINY_STEPS, 3
    else:
        counts, shapes, size, steps, classes = [5, 10, 20, 40], PAPER_TAP_SHAPES, PAPER_SIZE, PAPER_STEPS, 34
    base = TrainSettings(protocol="fast", device="cpu", threads=1)
    rows = []
    for count in counts:
        store = write_synthetic_store(scratch / f"memory-{count}.zarr", "native", count, size, shapes, steps, classes)
        pixels = count * size * size
        train_steps = base.buffer_pixels // base.fast_batch_size + STEPS_PAST_FIRST_BUFFER
        settings = dataclasses.replace(base, fast_epochs=train_steps * base.fast_batch_size / pixels)
        measured = run_child(
            "bench.training_memory",
            {"store": str(store), "out": str(scratch / "memory-ensemble"), "settings": dataclasses.asdict(settings)},
        )
        feature_dim = measured["feature_dim"]
        held = {
            "buffers": 2 * settings.buffer_pixels * feature_dim * 2,  # float16
            "table_cache": measured["table_cache_bytes"],
            "model_and_optimizer": model_state_bytes(feature_dim, classes, settings.members),
            "fused_batch": settings.members * settings.fast_batch_size * feature_dim * (4 + 2),
            "labeled_pixel_index": measured["training_pixels"] * (10 + 4),  # LabeledPixels + epoch order
        }
        rows.append(
            {
                "images": count,
                **measured,
                "held_by_choice": held,
                "held_by_choice_bytes": sum(held.values()),
                "beyond_held_bytes": measured["peak_rss_bytes"] - sum(held.values()),
                "peak_minus_cache_bytes": measured["peak_rss_bytes"] - measured["table_cache_bytes"],
                "official_fp32_bytes": official_bytes(count, size, feature_dim),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(store)
    first, last = rows[0], rows[-1]
    growth = last["beyond_held_bytes"] / first["beyond_held_bytes"] - 1
    growth_beyond_cache = last["peak_minus_cache_bytes"] / first["peak_minus_cache_bytes"] - 1
    index_growth = last["held_by_choice"]["labeled_pixel_index"] - first["held_by_choice"]["labeled_pixel_index"]
    growth_counting_index = (last["beyond_held_bytes"] + index_growth) / first["beyond_held_bytes"] - 1
    return {
        "what": "peak RSS of the train stage (fast protocol, default buffer and cache) vs training images",
        "settings": {
            "buffer_pixels": base.buffer_pixels,
            "cache_megabytes": base.cache_megabytes,
            "fast_batch_size": base.fast_batch_size,
            "steps_per_measurement": base.buffer_pixels // base.fast_batch_size + STEPS_PAST_FIRST_BUFFER,
        },
        "rows": rows,
        "growth_beyond_held": round(growth, 4),
        "growth_beyond_held_counting_the_pixel_index_as_growth": round(growth_counting_index, 4),
        "growth_beyond_cache": round(growth_beyond_cache, 4),
        "peak_rss_bytes_at_most_images": last["peak_rss_bytes"],
        "official_fp32_bytes_at_most_images": last["official_fp32_bytes"],
        "targets": {
            "flat (growth beyond what is held by choice < 10 %)": growth < 0.10,
            "at most 4 GB at the largest count": last["peak_rss_bytes"] <= 4e9,
        },
    }


def main() -> None:
    child_benchmark_main("training_memory", __doc__, run, child)


if __name__ == "__main__":
    main()
