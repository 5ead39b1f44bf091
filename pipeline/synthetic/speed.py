"""How much faster the distilled segmenter segments an image than the diffusion features + ensemble
it was distilled from: both run on the same images, interleaved image by image (the machine's
state is shared), each image's time from decoding the file to its labels."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pipeline.data.folders import ImageRecord, list_images
from pipeline.heads.pixel_ensemble.ensemble import load_ensemble
from pipeline.heads.segmenter.segmenter import load_segmenter
from pipeline.prediction import ensemble_predictor, load_checked_source, segmenter_predictor
from pipeline.runtime.devices import torch_threads


def seconds_per_image(
    predictors: dict[str, Callable[[ImageRecord], object]], records: Sequence[ImageRecord], warmup: int = 1
) -> dict[str, float]:
    """The median seconds per image of each predictor over `records`, after `warmup` untimed images."""
    times: dict[str, list[float]] = {name: [] for name in predictors}
    for position, record in enumerate(records):
        for name, predict in predictors.items():
            started = time.perf_counter()
            predict(record)
            if position >= warmup:
                times[name].append(time.perf_counter() - started)
    if not all(times.values()):
        raise ValueError(f"need more than {warmup} images to time, got {len(records)}")
    return {name: statistics.median(values) for name, values in times.items()}


def measure_speedup(
    checkpoint: str | Path, ensemble_dir: str | Path, segmenter_dir: str | Path, images_dir: str | Path,
    device: str = "cpu", threads: int = 1, images: int = 16,
) -> dict:
    """Seconds per image of extract + ensemble and of the segmenter on the first `images` of a
    folder, and the ratio (`synthetic_speedup`)."""
    ensemble = load_ensemble(ensemble_dir)
    source = load_checked_source(ensemble, Path(ensemble_dir), Path(checkpoint), device)
    predictors = {"features_and_ensemble": ensemble_predictor(ensemble, source),
                  "segmenter": segmenter_predictor(load_segmenter(segmenter_dir, source.device))}
    records = list_images(images_dir)[: images + 1]
    with torch_threads(threads):
        seconds = seconds_per_image(predictors, records)
    return {
        "images": len(records) - 1,
        "device": str(source.device),
        "threads": threads,
        "seconds_per_image": {name: round(value, 5) for name, value in seconds.items()},
        "synthetic_speedup": round(seconds["features_and_ensemble"] / seconds["segmenter"], 1),
    }
