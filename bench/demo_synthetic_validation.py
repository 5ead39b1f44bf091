"""DatasetDDPM on the demo: what the synthetic set's size, the sampler's steps and the uncertainty
filter each change, per class, on validation faces (never the test split).

The labeling ensemble is the demo's headline ensemble (`dvc repro`: data/models/ensemble-ddpm,
trained on the 20 labeled faces at the taps `select` chose). For each sampler setting and
sampling seed, one synthetic set of the largest count is drawn once (no filter); smaller counts
are its first samples, and each filter is applied to those samples' recorded uncertainties, as
`synthesize` does. A segmenter (params.yaml's `segmenter`, its seed = the sampling seed) trains on
each variant, keeps its best epoch on the 20 labeled faces, and is scored on 64 validation faces
of another seed, beside the ensemble itself on the same faces. `--segmenter key=value,…`
changes params.yaml's segmenter settings (e.g. flips=true,width=32,epochs=40). Results go to
bench/results/demo_synthetic_validation.json after every variant, beside earlier ones (a variant
measured again replaces its entry). The synthetic sets stay in --scratch, so a stopped run
resumes them.

    python -m bench.demo_synthetic_validation [--runs ddpm:25:1000:0,ddim:10:500:0] [--counts 250,500,1000]
"""

import argparse
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import PROJECT_ROOT
from bench.demo_checkpoint_validation import VALIDATION_SEED_OFFSET
from pipeline.config import load_params
from pipeline.data.demo import write_demo_dataset
from pipeline.data.folders import find_class_info, list_images, load_example
from pipeline.evaluation.predict import predict_store
from pipeline.evaluation.scoring import score_predictions
from pipeline.extraction.extract import extract_features
from pipeline.heads.segmenter.segmenter import load_segmenter
from pipeline.heads.segmenter.training import train_segmenter
from pipeline.metrics import IoUAccumulator
from pipeline.synthetic.filtering import kept_samples
from pipeline.synthetic.synthesize import sample_name, synthesize_dataset

SEGMENTER_KEYS = ("architecture", "width", "epochs", "batch_size", "learning_rate", "flips")


def _variant_key(entry: dict) -> tuple:
    """What makes two variants the same measurement (older entries lack the later settings)."""
    segmenter = entry.get("segmenter", {})
    return (entry["sampler"], entry["sampling_steps"], entry["count"], entry["filter_fraction"], entry["seed"],
            *(segmenter.get(key, False) for key in SEGMENTER_KEYS))


def _variant_folder(synthetic: Path, out: Path, count: int, filter_fraction: float, lowest_fraction: float) -> int:
    """A labeled folder of the first `count` samples the filter keeps (hard links); returns how many."""
    manifest = json.loads((synthetic / "manifest.json").read_text())
    uncertainties = np.array([sample["uncertainty"] for sample in manifest["samples"][:count]])
    kept = kept_samples(uncertainties, filter_fraction, min(lowest_fraction, filter_fraction))
    out.mkdir(parents=True)
    os.link(synthetic / "classes.json", out / "classes.json")
    for index in np.flatnonzero(kept):
        for suffix in (".png", ".npy"):
            os.link(synthetic / f"{sample_name(index)}{suffix}", out / f"{sample_name(index)}{suffix}")
    return int(kept.sum())


def _segmenter_scores(segmenter_dir: Path, validation_images: Path) -> dict:
    segmenter = load_segmenter(segmenter_dir)
    classes = find_class_info(validation_images)
    accumulator = IoUAccumulator(classes.num_classes, classes.ignore_label)
    for record in list_images(validation_images):
        image, labels = load_example(record, segmenter.image_size, classes)
        predicted = segmenter.probabilities(torch.from_numpy(image)[None])[0].argmax(dim=0).numpy()
        accumulator.update(predicted, labels)
    per_class = accumulator.per_class_iou("paper")
    return {"miou": round(accumulator.mean_iou("paper"), 4),
            "per_class_iou": {name: round(float(value), 4) for name, value in zip(classes.names, per_class)}}


def _overrides(text: str) -> dict:
    """"flips=true,width=32" → {"flips": True, "width": 32}."""
    values = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        values[key.strip()] = {"true": True, "false": False}.get(value.strip().lower(), None)
        if values[key.strip()] is None:
            values[key.strip()] = float(value) if "." in value else int(value)
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(PROJECT_ROOT / "data" / "checkpoints" / "demo_ddpm"))
    parser.add_argument("--ensemble", default=str(PROJECT_ROOT / "data" / "models" / "ensemble-ddpm"))
    parser.add_argument("--runs", default="ddpm:25:1000:0,ddim:10:500:0,ddpm:25:500:1",
                        help="sampler:steps:largest count:sampling seed, comma-separated")
    parser.add_argument("--counts", default="250,500,1000", help="set sizes to train on (at most a run's count)")
    parser.add_argument("--filters", default="0,0.1,0.2", help="filter fractions")
    parser.add_argument("--filter-at", default="500", help="the count at which every filter is tried (others: params.yaml's)")
    parser.add_argument("--segmenter", default="", help="segmenter settings to change, key=value,… (true/false, numbers)")
    parser.add_argument("--scratch", default=str(PROJECT_ROOT / "runs" / "synthetic-validation"))
    parser.add_argument("--validation-images", type=int, default=64)
    parser.add_argument("--out", default=str(PROJECT_ROOT / "bench" / "results" / "demo_synthetic_validation.json"))
    arguments = parser.parse_args()
    params = load_params(PROJECT_ROOT / "params.yaml")
    out = Path(arguments.out)
    segmenter_settings = dataclasses.replace(params.segmenter, **_overrides(arguments.segmenter))
    earlier = json.loads(out.read_text())["variants"] if out.is_file() else []
    results = {"checkpoint": arguments.checkpoint, "ensemble": arguments.ensemble,
               "validation_images": arguments.validation_images, "variants": earlier}
    scratch = Path(arguments.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    # The labeled faces (best epoch) and validation faces of another seed; the ensemble on the latter.
    spec = dataclasses.replace(params.demo, pool_images=0, test_images=arguments.validation_images)
    for folder in ("train_data", "validation_data", "val.zarr", "val-predictions.zarr"):
        shutil.rmtree(scratch / folder, ignore_errors=True)
    write_demo_dataset(spec, scratch / "train_data")
    write_demo_dataset(dataclasses.replace(spec, seed=spec.seed + VALIDATION_SEED_OFFSET), scratch / "validation_data")
    labeled, validation = scratch / "train_data" / "real" / "train", scratch / "validation_data" / "real" / "test"
    classes = find_class_info(validation)
    extract_features(arguments.checkpoint, validation, scratch / "val.zarr", params.extract, classes, show_progress=False)
    predictions = predict_store(arguments.ensemble, scratch / "val.zarr", scratch / "val-predictions.zarr", show_progress=False)
    ensemble_scores = score_predictions(predictions, scratch / "val.zarr", "paper", show_progress=False)
    results["ensemble"] = {"miou": ensemble_scores["miou"], "per_class_iou": ensemble_scores["per_class_iou"]}
    print(json.dumps({"ensemble_validation_miou": ensemble_scores["miou"]}), flush=True)
    for run in arguments.runs.split(","):
        sampler, steps, count, seed = run.split(":")
        settings = dataclasses.replace(params.synthesize, sampler=sampler, sampling_steps=int(steps), count=int(count),
                                       seed=int(seed), filter_fraction=0.0, filter_lowest_fraction=0.0, pictures=0)
        synthetic = scratch / f"synthetic-{run.replace(':', '-')}"
        started = time.perf_counter()
        synthesize_dataset(arguments.checkpoint, arguments.ensemble, synthetic, settings, show_progress=False)
        sampling_seconds = time.perf_counter() - started
        variants = [(size, params.synthesize.filter_fraction) for size in map(int, arguments.counts.split(","))
                    if size <= settings.count]
        variants += [(int(arguments.filter_at), float(fraction)) for fraction in arguments.filters.split(",")
                     if int(arguments.filter_at) <= settings.count]
        for size, fraction in dict.fromkeys(variants):
            name = f"{sampler}-{steps}-n{size}-f{fraction}-s{seed}"
            for folder in (name, f"{name}-segmenter"):
                shutil.rmtree(scratch / folder, ignore_errors=True)
            kept = _variant_folder(synthetic, scratch / name, size, fraction, params.synthesize.filter_lowest_fraction)
            variant_settings = dataclasses.replace(segmenter_settings, seed=int(seed))
            started = time.perf_counter()
            summary = train_segmenter(scratch / name, scratch / f"{name}-segmenter", variant_settings, labeled,
                                      show_progress=False)
            scores = _segmenter_scores(scratch / f"{name}-segmenter", validation)
            entry = {"sampler": sampler, "sampling_steps": int(steps), "count": size, "filter_fraction": fraction,
                     "seed": int(seed), "kept": kept, "validation_miou": scores["miou"],
                     "per_class_iou": scores["per_class_iou"], "chosen_epoch": summary.chosen_epoch,
                     "labeled_faces_miou": summary.validation_miou,
                     "synthesis_seconds_for_largest_count": round(sampling_seconds, 1),
                     "segmenter_seconds": round(time.perf_counter() - started, 1),
                     "segmenter": {key: getattr(variant_settings, key) for key in SEGMENTER_KEYS}}
            results["variants"] = [earlier for earlier in results["variants"] if _variant_key(earlier) != _variant_key(entry)]
            results["variants"].append(entry)
            print(json.dumps({k: entry[k] for k in ("sampler", "sampling_steps", "count", "filter_fraction", "seed",
                                                    "validation_miou", "segmenter_seconds")}), flush=True)
            out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
