"""Which demo DDPM checkpoint gives the best features? Validation mIoU per checkpoint.

Validation scenes come from another seed than the demo's splits (the test split is never
looked at). Each checkpoint is compared with the same architecture with random weights, at the
demo's steps and blocks (params.yaml), with the chosen training protocol. Used to pick the
committed demo DDPM among the checkpoints of a pretraining run; results go to
bench/results/demo_checkpoint_validation.json (one entry per checkpoint, appended).

    python -m bench.demo_checkpoint_validation --checkpoint runs/demo_ddpm/model [--protocol paper]
"""

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

from pipeline.backbones import load_backbone, randomly_initialised_unet
from pipeline.config import EvaluateSettings, load_params
from pipeline.datasets import find_class_info
from pipeline.demo import write_demo_dataset
from pipeline.evaluation import evaluate_on_store
from pipeline.extract import extract_features
from pipeline.training import train_on_store

PROJECT_ROOT = Path(__file__).resolve().parents[1]
VALIDATION_SEED_OFFSET = 1000  # the demo's seed + this: scenes no split of the demo contains


def validation_miou(checkpoint: Path, scratch: Path, validation_images: int, protocol: str, seeds: list[int]) -> dict:
    """mIoU on validation scenes of the checkpoint's features and of its random-weights twin."""
    params = load_params(PROJECT_ROOT / "params.yaml")
    spec = dataclasses.replace(params.demo, pool_images=0, test_images=validation_images)
    write_demo_dataset(spec, scratch / "train_data")
    write_demo_dataset(dataclasses.replace(spec, seed=spec.seed + VALIDATION_SEED_OFFSET), scratch / "validation_data")
    classes = find_class_info(scratch / "train_data" / "real" / "train")
    architecture = load_backbone(checkpoint).architecture
    randomly_initialised_unet(architecture, params.baselines.random_weights_seed).save_pretrained(scratch / "random_unet")
    result = {}
    for source, weights in (("ddpm", checkpoint), ("random", scratch / "random_unet")):
        run = scratch / source
        extract_features(weights, scratch / "train_data" / "real" / "train", run / "train.zarr", params.extract, classes, show_progress=False)
        extract_features(weights, scratch / "validation_data" / "real" / "test", run / "val.zarr", params.extract, classes, show_progress=False)
        result[source] = []
        for seed in seeds:
            settings = dataclasses.replace(params.train, protocol=protocol, seed=seed)
            train_on_store(run / "train.zarr", run / f"ensemble-{seed}", settings, show_progress=False)
            metrics = evaluate_on_store(run / f"ensemble-{seed}", run / "val.zarr", run / f"results-{seed}", EvaluateSettings(threads=1), show_progress=False)
            result[source].append(round(metrics["miou"], 6))
    result["margin_points"] = [round(100 * (d - r), 2) for d, r in zip(result["ddpm"], result["random"])]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="A diffusers model folder (e.g. runs/demo_ddpm/model).")
    parser.add_argument("--label", help="Name of the entry (default: the checkpoint path).")
    parser.add_argument("--validation-images", type=int, default=64)
    parser.add_argument("--protocol", default="fast", choices=["fast", "paper"])
    parser.add_argument("--seeds", default="0", help="Ensemble seeds, comma-separated.")
    parser.add_argument("--out", default=str(PROJECT_ROOT / "bench" / "results" / "demo_checkpoint_validation.json"))
    arguments = parser.parse_args()
    seeds = [int(seed) for seed in arguments.seeds.split(",")]
    with tempfile.TemporaryDirectory() as scratch:
        result = validation_miou(Path(arguments.checkpoint), Path(scratch), arguments.validation_images, arguments.protocol, seeds)
    entry = {"checkpoint": arguments.label or arguments.checkpoint, "protocol": arguments.protocol,
             "validation_images": arguments.validation_images, **result}
    print(json.dumps(entry), flush=True)
    out = Path(arguments.out)
    entries = json.loads(out.read_text()) if out.is_file() else []
    out.write_text(json.dumps(entries + [entry], indent=1) + "\n")


if __name__ == "__main__":
    main()
