"""Target 3: the fast protocol reaches the paper protocol's mIoU at least 10× faster.

Both protocols train on the same store, one after the other for each seed (side by side, one
thread each), and are scored on the same test store:

- demo: the cartoon-face demo (20 labeled 32×32 faces, 64 test faces) with the committed demo
  DDPM's features (params.yaml's extract settings: 864 features per pixel);
- cat_15: the paper's cat_15 split (30 train, 20 test) from ../shared, resized to 64×64, with
  features of ../shared/fixtures/adm-tiny (the paper's ADM architecture at 1/8 width, random
  weights: 1056 features per pixel). Skipped when ../shared is absent.

    python -m bench.training_speed [--quick] [--seeds 2]
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path

import numpy as np

from bench.common import (
    PROJECT_ROOT,
    SHARED,
    TINY_STEPS,
    TINY_TAP_SHAPES,
    command_line,
    write_result,
    write_synthetic_store,
)
from pipeline.config import EvaluateSettings, ExtractSettings, TrainSettings, load_params
from pipeline.evaluation.predict import predict_image
from pipeline.heads.pixel_ensemble.training import train_on_store
from pipeline.metrics import IoUAccumulator
from pipeline.runtime.devices import torch_threads
from pipeline.store.reader import FeatureStore

DEMO_CHECKPOINT = PROJECT_ROOT / "data" / "checkpoints" / "demo_ddpm"
CAT = SHARED / "datasets" / "ddpm-seg" / "cat_15"
ADM_TINY = SHARED / "fixtures" / "adm-tiny" / "adm_tiny.pt"


def test_miou(ensemble, store_path: Path) -> float:
    """mIoU of an ensemble on every labeled image of a store, as the evaluate stage scores it."""
    store = FeatureStore(store_path)
    accumulator = IoUAccumulator(ensemble.num_classes, ensemble.ignore_label)
    with torch_threads(1):
        for index in np.flatnonzero(store.done_mask()):
            labels = store.labels(int(index))
            if labels is not None:
                prediction = predict_image(ensemble, store, int(index), EvaluateSettings().pixels_per_batch)
                accumulator.update(prediction.labels, labels)
    return accumulator.mean_iou()


def compare_protocols(train_store: Path, test_store: Path, scratch: Path, seeds: int, base: TrainSettings) -> dict:
    """Paper and fast protocol, interleaved per seed: seconds and test mIoU of each."""
    runs = {"paper": [], "fast": []}
    for seed in range(seeds):
        for protocol in ("paper", "fast"):
            settings = dataclasses.replace(base, protocol=protocol, seed=seed, threads=1, device="cpu")
            started = time.perf_counter()
            ensemble, summary = train_on_store(train_store, scratch / f"ensemble-{protocol}", settings, show_progress=False)
            seconds = time.perf_counter() - started
            runs[protocol].append(
                {"seed": seed, "seconds": round(seconds, 2), "miou": round(test_miou(ensemble, test_store), 4),
                 "epochs": summary.epochs_per_member[0], "training_pixels": summary.training_pixels}
            )
            print(protocol, json.dumps(runs[protocol][-1]), flush=True)
    paper_seconds = statistics.median(run["seconds"] for run in runs["paper"])
    fast_seconds = statistics.median(run["seconds"] for run in runs["fast"])
    paper_miou = statistics.mean(run["miou"] for run in runs["paper"])
    fast_miou = statistics.mean(run["miou"] for run in runs["fast"])
    return {
        "runs": runs,
        "paper_seconds_median": paper_seconds,
        "fast_seconds_median": fast_seconds,
        "speedup": round(paper_seconds / fast_seconds, 2),
        "paper_miou_mean": round(paper_miou, 4),
        "fast_miou_mean": round(fast_miou, 4),
        "miou_gap_points": round(100 * (paper_miou - fast_miou), 2),
        "targets": {"speedup >= 10": paper_seconds / fast_seconds >= 10, "mIoU within 1 point": paper_miou - fast_miou <= 0.01},
    }


def demo_stores(scratch: Path) -> tuple[Path, Path]:
    """The demo's train and test faces, extracted with the committed demo DDPM."""
    from pipeline.data.demo import write_demo_dataset
    from pipeline.data.folders import find_class_info
    from pipeline.extraction.extract import extract_features

    params = load_params(PROJECT_ROOT / "params.yaml")
    data = scratch / "demo"
    write_demo_dataset(dataclasses.replace(params.demo, pool_images=0), data)
    classes = find_class_info(data / "real" / "train")
    for split in ("train", "test"):
        extract_features(DEMO_CHECKPOINT, data / "real" / split, scratch / f"demo-{split}.zarr", params.extract, classes,
                         replace_mismatched=True, show_progress=False)
    return scratch / "demo-train.zarr", scratch / "demo-test.zarr"


def cat_stores(scratch: Path, size: int) -> tuple[Path, Path]:
    """cat_15's splits at size×size, extracted with the adm-tiny fixture (random weights)."""
    from pipeline.data.folders import find_class_info
    from pipeline.extraction.extract import extract_features

    settings = ExtractSettings(size=size, device="cpu", batch_size=8)
    for split in ("train", "test"):
        images = CAT / "real" / split
        extract_features(ADM_TINY, images, scratch / f"cat-{split}.zarr", settings, find_class_info(images),
                         replace_mismatched=True, show_progress=False)
    return scratch / "cat-train.zarr", scratch / "cat-test.zarr"


def run(quick: bool, scratch: Path, seeds: int = 2, cat_seeds: int = 1, cat_size: int = 64) -> dict:
    results = {"what": "paper vs fast protocol: wall time of the train stage (1 thread) and test mIoU"}
    base = TrainSettings()
    results["fast_settings"] = {
        "fast_batch_size": base.fast_batch_size, "fast_learning_rate": base.fast_learning_rate, "fast_epochs": base.fast_epochs
    }
    if quick:
        train = write_synthetic_store(scratch / "speed-train.zarr", "native", 2, 16, TINY_TAP_SHAPES, TINY_STEPS, 3)
        test = write_synthetic_store(scratch / "speed-test.zarr", "native", 1, 16, TINY_TAP_SHAPES, TINY_STEPS, 3, seed=1)
        quick_settings = dataclasses.replace(base, members=2, max_epochs=5)
        results["synthetic"] = compare_protocols(train, test, scratch, 1, quick_settings)
        return results
    train, test = demo_stores(scratch)
    results["demo"] = compare_protocols(train, test, scratch, seeds, base)
    if cat_seeds == 0:
        results["cat_15"] = "skipped: --cat-seeds 0"
    elif CAT.is_dir() and ADM_TINY.is_file():
        train, test = cat_stores(scratch, cat_size)
        results[f"cat_15 ({cat_size}x{cat_size}, adm-tiny random weights)"] = compare_protocols(train, test, scratch, cat_seeds, base)
    else:
        results["cat_15"] = f"skipped: {CAT} or {ADM_TINY} is absent"
    return results


def main() -> None:
    def options(parser):
        parser.add_argument("--seeds", type=int, default=2, help="seeds per protocol on the demo")
        parser.add_argument("--cat-seeds", type=int, default=1, help="seeds per protocol on cat_15 (0: skip it)")

    arguments, scratch = command_line(__doc__, add_options=options)
    print(write_result("training_speed", run(arguments.quick, scratch, arguments.seeds, arguments.cat_seeds)))


if __name__ == "__main__":
    main()
