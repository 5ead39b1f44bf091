"""Which demo DDPM checkpoint gives the best features? Validation mIoU per checkpoint.

Validation faces come from another seed than the demo's splits (the test split is never
looked at). Each checkpoint is compared with the same architecture with random weights, at the
demo's steps and blocks (params.yaml), and with the raw-pixel baseline, with the chosen training
protocol and labeled budget. Used to pick the committed demo DDPM among the checkpoints of a
pretraining run; results go to bench/results/demo_checkpoint_validation.json (one entry per run,
appended). bench/demo_feature_sweep.py uses the same helpers to compare steps and blocks.

    python -m bench.demo_checkpoint_validation --checkpoint runs/demo_ddpm/model [--protocol paper] [--train-images 10]
"""

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

from bench.common import PROJECT_ROOT
from pipeline.config import DemoSpec, EvaluateSettings, ExtractSettings, TrainSettings, load_params
from pipeline.data.demo import write_demo_dataset
from pipeline.data.folders import ClassInfo, find_class_info
from pipeline.evaluation.evaluate import evaluate_on_store
from pipeline.extraction.extract import extract_features
from pipeline.extraction.pixels import extract_pixel_features
from pipeline.heads.pixel_ensemble.training import train_on_store
from pipeline.sources.checkpoints import load_backbone, randomly_initialised_unet

VALIDATION_SEED_OFFSET = 1000  # the demo's seed + this: faces no split of the demo contains


@dataclasses.dataclass(frozen=True)
class ValidationData:
    """The demo's labeled training faces and validation faces of another seed."""

    train_images: Path
    validation_images: Path
    classes: ClassInfo


def write_validation_data(scratch: Path, demo: DemoSpec, validation_images: int) -> ValidationData:
    """Writes the demo's training faces and `validation_images` validation faces of another seed."""
    spec = dataclasses.replace(demo, pool_images=0, test_images=validation_images)
    write_demo_dataset(spec, scratch / "train_data")
    write_demo_dataset(dataclasses.replace(spec, seed=spec.seed + VALIDATION_SEED_OFFSET), scratch / "validation_data")
    train_images = scratch / "train_data" / "real" / "train"
    return ValidationData(train_images, scratch / "validation_data" / "real" / "test", find_class_info(train_images))


def write_random_twin(checkpoint: Path, seed: int, out_dir: Path) -> Path:
    """The checkpoint's architecture with random weights drawn from `seed`, saved to out_dir."""
    randomly_initialised_unet(load_backbone(checkpoint).architecture, seed).save_pretrained(out_dir)
    return out_dir


def validation_miou(
    weights: Path, data: ValidationData, run_dir: Path, extract: ExtractSettings, trainings: list[TrainSettings]
) -> list[float]:
    """Extracts the training and validation faces with `weights`; mIoU of one ensemble per training setting."""
    extract_features(weights, data.train_images, run_dir / "train.zarr", extract, data.classes, show_progress=False)
    extract_features(weights, data.validation_images, run_dir / "val.zarr", extract, data.classes, show_progress=False)
    return _ensemble_mious(run_dir, trainings)


def pixel_validation_miou(
    data: ValidationData, run_dir: Path, size: int, neighbourhood: int, trainings: list[TrainSettings]
) -> list[float]:
    """The same as validation_miou for the raw-pixel baseline (each pixel's RGB neighbourhood)."""
    for images, store in ((data.train_images, "train.zarr"), (data.validation_images, "val.zarr")):
        extract_pixel_features(images, run_dir / store, size, neighbourhood, data.classes, show_progress=False)
    every_tap = [dataclasses.replace(settings, steps=None, blocks=None) for settings in trainings]  # one tap, no steps
    return _ensemble_mious(run_dir, every_tap)


def _ensemble_mious(run_dir: Path, trainings: list[TrainSettings]) -> list[float]:
    """Trains one ensemble per setting on run_dir/train.zarr; their mIoU on run_dir/val.zarr."""
    mious = []
    for number, settings in enumerate(trainings):
        ensemble = run_dir / f"ensemble-{number}"
        train_on_store(run_dir / "train.zarr", ensemble, settings, show_progress=False)
        metrics = evaluate_on_store(ensemble, run_dir / "val.zarr", run_dir / f"results-{number}", EvaluateSettings(threads=1), show_progress=False)
        mious.append(round(metrics["miou"], 6))
    return mious


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="A diffusers model folder (e.g. runs/demo_ddpm/model).")
    parser.add_argument("--label", help="Name of the entry (default: the checkpoint path).")
    parser.add_argument("--validation-images", type=int, default=64)
    parser.add_argument("--protocol", choices=["fast", "paper"], help="Training protocol (default: params.yaml train.protocol).")
    parser.add_argument("--seeds", default="0", help="Ensemble seeds, comma-separated.")
    parser.add_argument("--train-images", type=int, help="Labeled training faces (default: params.yaml demo.train_images).")
    parser.add_argument("--out", default=str(PROJECT_ROOT / "bench" / "results" / "demo_checkpoint_validation.json"))
    arguments = parser.parse_args()
    params = load_params(PROJECT_ROOT / "params.yaml")
    protocol = arguments.protocol or params.train.protocol
    trainings = [dataclasses.replace(params.train, protocol=protocol, seed=int(seed)) for seed in arguments.seeds.split(",")]
    checkpoint = Path(arguments.checkpoint)
    demo = dataclasses.replace(params.demo, train_images=arguments.train_images or params.demo.train_images)
    baselines = params.baselines
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        data = write_validation_data(scratch, demo, arguments.validation_images)
        random_twin = write_random_twin(checkpoint, baselines.random_weights_seed, scratch / "random_unet")
        result = {source: validation_miou(weights, data, scratch / source, params.extract, trainings)
                  for source, weights in (("ddpm", checkpoint), ("random", random_twin))}
        result["pixels"] = pixel_validation_miou(
            data, scratch / "pixels", params.extract.size, baselines.pixel_neighbourhood, trainings
        )
    result["margin_points"] = [round(100 * (d - r), 2) for d, r in zip(result["ddpm"], result["random"])]
    result["margin_over_pixels_points"] = [round(100 * (d - p), 2) for d, p in zip(result["ddpm"], result["pixels"])]
    entry = {"checkpoint": arguments.label or arguments.checkpoint, "protocol": protocol,
             "train_images": demo.train_images, "validation_images": arguments.validation_images, **result}
    print(json.dumps(entry), flush=True)
    out = Path(arguments.out)
    entries = json.loads(out.read_text()) if out.is_file() else []
    out.write_text(json.dumps(entries + [entry], indent=1) + "\n")


if __name__ == "__main__":
    main()
