"""Does the fast protocol learn every class the paper protocol learns? Per-class validation IoU.

The fast protocol trains all members together for a fixed budget of steps; the paper protocol
trains them one by one until the loss stops improving. On small images (few labeled pixels) a
budget of passes is only a few hundred steps, and small parts were never learned (IoU 0). This
benchmark scores, per class and on validation images only (never a test split):

- demo: the cartoon-face demo's 20 labeled faces with the committed demo DDPM's features,
  scored on 64 validation faces of another seed;
- ffhq_34 (from ../shared, resized to 64×64, features of ../shared/fixtures/adm-tiny: the
  paper's ADM architecture at 1/8 width with random weights): its first 14 training images
  train, the other 6 validate. Skipped when ../shared is absent.

Each protocol variant runs per seed, interleaved (one thread each); the result holds seconds,
mIoU, per-class IoU, and the worst class gap to the paper protocol.

    python -m bench.fast_protocol_classes [--quick] [--seeds 0,1]
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
import time
from pathlib import Path

from bench.common import PROJECT_ROOT, SHARED, command_line, write_result
from bench.demo_checkpoint_validation import write_validation_data
from pipeline.config import EvaluateSettings, ExtractSettings, TrainSettings, load_params
from pipeline.data.folders import find_class_info
from pipeline.evaluation.evaluate import evaluate_on_store
from pipeline.extraction.extract import extract_features
from pipeline.heads.pixel_ensemble.training import train_on_store

DEMO_CHECKPOINT = PROJECT_ROOT / "data" / "checkpoints" / "demo_ddpm"
FFHQ = SHARED / "datasets" / "ddpm-seg" / "ffhq_34"
ADM_TINY = SHARED / "fixtures" / "adm-tiny" / "adm_tiny.pt"
FFHQ_TRAIN_IMAGES = 14  # of its 20 training images; the other 6 validate


def variants(base: TrainSettings) -> dict[str, TrainSettings]:
    """The protocols compared: the paper's, the fast default, and the fast one without its step floor."""
    return {
        "paper": dataclasses.replace(base, protocol="paper"),
        "fast": dataclasses.replace(base, protocol="fast"),
        "fast, no step floor": dataclasses.replace(base, protocol="fast", fast_min_steps=0),
    }


def compare_per_class(train_store: Path, validation_store: Path, scratch: Path, seeds: list[int], base: TrainSettings) -> dict:
    """Every variant for every seed: seconds, mIoU and per-class IoU on the validation store."""
    runs: dict[str, list[dict]] = {name: [] for name in variants(base)}
    for seed in seeds:
        for name, settings in variants(dataclasses.replace(base, seed=seed, threads=1, device="cpu")).items():
            started = time.perf_counter()
            train_on_store(train_store, scratch / "ensemble", settings, show_progress=False)
            seconds = time.perf_counter() - started
            metrics = evaluate_on_store(scratch / "ensemble", validation_store, scratch / "results",
                                        EvaluateSettings(threads=1, pictures=1), show_progress=False)
            runs[name].append({"seed": seed, "seconds": round(seconds, 2), "miou": round(metrics["miou"], 4),
                               "per_class_iou": {k: None if v is None else round(v, 4) for k, v in metrics["per_class_iou"].items()}})
            print(name, json.dumps(runs[name][-1]), flush=True)
    summary = summarise(runs)
    fast = summary["fast"]
    targets = {
        "speedup >= 5": fast["speedup_over_paper"] >= 5,
        "mIoU within 1 point": fast["miou_gap_points"] <= 1.0,
        "no class more than 5 points below": max(fast["worst_class_gap_points"].values()) <= 5.0,
    }
    return {"runs": runs, "summary": summary, "targets": targets}


def summarise(runs: dict[str, list[dict]]) -> dict:
    """Per variant: median seconds, mean mIoU and per-class IoU over seeds, and gaps to the paper protocol."""
    def mean_per_class(variant_runs):
        names = list(variant_runs[0]["per_class_iou"])
        return {name: round(statistics.mean(run["per_class_iou"][name] or 0.0 for run in variant_runs), 4) for name in names}

    paper_seconds = statistics.median(run["seconds"] for run in runs["paper"])
    paper_miou = statistics.mean(run["miou"] for run in runs["paper"])
    paper_classes = mean_per_class(runs["paper"])
    summary = {}
    for name, variant_runs in runs.items():
        seconds = statistics.median(run["seconds"] for run in variant_runs)
        miou = statistics.mean(run["miou"] for run in variant_runs)
        classes = mean_per_class(variant_runs)
        gaps = {cls: round(100 * (paper_classes[cls] - classes[cls]), 2) for cls in classes}
        worst = max(gaps, key=gaps.get)
        summary[name] = {
            "seconds_median": seconds,
            "speedup_over_paper": round(paper_seconds / seconds, 2),
            "miou_mean": round(miou, 4),
            "miou_gap_points": round(100 * (paper_miou - miou), 2),
            "per_class_iou_mean": classes,
            "worst_class_gap_points": {worst: gaps[worst]},
            "classes_at_zero": [cls for cls, iou in classes.items() if iou == 0.0],
        }
    return summary


def demo_stores(scratch: Path, checkpoint: Path) -> tuple[Path, Path]:
    """The demo's labeled faces and validation faces of another seed, extracted with `checkpoint`."""
    params = load_params(PROJECT_ROOT / "params.yaml")
    data = write_validation_data(scratch, params.demo, validation_images=64)
    extract_features(checkpoint, data.train_images, scratch / "demo-train.zarr", params.extract, data.classes, show_progress=False)
    extract_features(checkpoint, data.validation_images, scratch / "demo-val.zarr", params.extract, data.classes, show_progress=False)
    return scratch / "demo-train.zarr", scratch / "demo-val.zarr"


def ffhq_stores(scratch: Path, size: int = 64) -> tuple[Path, Path]:
    """ffhq_34's training images split into train and validation folders (links), extracted at size×size."""
    images = sorted((FFHQ / "real" / "train").glob("*.png"))
    settings = ExtractSettings(size=size, device="cpu", batch_size=8)
    stores = []
    for split, chosen in (("train", images[:FFHQ_TRAIN_IMAGES]), ("val", images[FFHQ_TRAIN_IMAGES:])):
        folder = scratch / "ffhq" / split
        folder.mkdir(parents=True)
        for image in chosen:
            for path in (image, image.with_suffix(".npy")):
                (folder / path.name).symlink_to(path)
        classes = find_class_info(FFHQ / "real" / "train")
        extract_features(ADM_TINY, folder, scratch / f"ffhq-{split}.zarr", settings, classes, show_progress=False)
        stores.append(scratch / f"ffhq-{split}.zarr")
    return stores[0], stores[1]


def run(quick: bool, scratch: Path, seeds: tuple[int, ...] = (0, 1), checkpoint: Path = DEMO_CHECKPOINT) -> dict:
    base = load_params(PROJECT_ROOT / "params.yaml").train
    results = {
        "what": "per-class validation IoU of the paper protocol and the fast one (with and without its step floor)",
        "fast_settings": {key: getattr(base, key) for key in ("fast_batch_size", "fast_learning_rate", "fast_epochs", "fast_min_steps")},
    }
    scratch = scratch / "fast_protocol_classes"  # its own, emptied: the demo generator wants empty folders
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    if quick:
        base = dataclasses.replace(base, members=2, max_epochs=3, fast_min_steps=20)
        seeds = seeds[:1]
    seeds = list(seeds)
    train, validation = demo_stores(scratch, checkpoint)
    results["demo"] = compare_per_class(train, validation, scratch, seeds, base)
    if quick:
        results["ffhq_34"] = "skipped: --quick"
    elif FFHQ.is_dir() and ADM_TINY.is_file():
        train, validation = ffhq_stores(scratch)
        results["ffhq_34 (64x64, adm-tiny random weights)"] = compare_per_class(train, validation, scratch, seeds, base)
    else:
        results["ffhq_34"] = f"skipped: {FFHQ} or {ADM_TINY} is absent"
    return results


def main() -> None:
    def options(parser):
        parser.add_argument("--seeds", default="0,1", help="ensemble seeds, comma-separated")
        parser.add_argument("--checkpoint", default=str(DEMO_CHECKPOINT), help="the demo DDPM (a diffusers folder)")

    arguments, scratch = command_line(__doc__, add_options=options)
    seeds = [int(seed) for seed in arguments.seeds.split(",")]
    print(write_result("fast_protocol_classes", run(arguments.quick, scratch, seeds, Path(arguments.checkpoint))))


if __name__ == "__main__":
    main()
