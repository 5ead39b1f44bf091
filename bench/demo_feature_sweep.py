"""Which steps and blocks suit the demo's small DDPM? mIoU on a validation split, per setting.

Validation scenes come from another seed than the demo's splits (the test split is never
looked at). For each setting, the DDPM and the same UNet with random weights are compared with
the default training protocol. Results go to bench/results/demo_feature_sweep.json.

    python -m bench.demo_feature_sweep --checkpoint data/checkpoints/demo_ddpm
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
SETTINGS = {
    "paper (t 50,150,250; blocks 5,6,7,8,12)": ([50, 150, 250], [5, 6, 7, 8, 12]),
    "low noise (t 10,50,100; blocks 5,6,7,8,12)": ([10, 50, 100], [5, 6, 7, 8, 12]),
    "fine blocks (t 50,150,250; blocks 8,9,10,11,12)": ([50, 150, 250], [8, 9, 10, 11, 12]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(PROJECT_ROOT / "data" / "checkpoints" / "demo_ddpm"))
    parser.add_argument("--validation-images", type=int, default=32)
    parser.add_argument("--out", default=str(PROJECT_ROOT / "bench" / "results" / "demo_feature_sweep.json"))
    arguments = parser.parse_args()
    params = load_params(PROJECT_ROOT / "params.yaml")
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        spec = dataclasses.replace(params.demo, pool_images=0, test_images=arguments.validation_images)
        write_demo_dataset(spec, scratch / "train_data")
        validation = dataclasses.replace(spec, seed=params.demo.seed + 1000)
        write_demo_dataset(validation, scratch / "validation_data")
        trained = load_backbone(arguments.checkpoint)
        randomly_initialised_unet(trained.architecture, 0).save_pretrained(scratch / "random_unet")
        classes = find_class_info(scratch / "train_data" / "real" / "train")
        for name, (steps, blocks) in SETTINGS.items():
            results[name] = {}
            for source, checkpoint in (("ddpm", arguments.checkpoint), ("random", scratch / "random_unet")):
                settings = dataclasses.replace(params.extract, steps=steps, blocks=blocks)
                run = scratch / f"{len(results)}-{source}"
                extract_features(checkpoint, scratch / "train_data" / "real" / "train", run / "train.zarr", settings, classes, show_progress=False)
                extract_features(checkpoint, scratch / "validation_data" / "real" / "test", run / "val.zarr", settings, classes, show_progress=False)
                train_on_store(run / "train.zarr", run / "ensemble", params.train, show_progress=False)
                metrics = evaluate_on_store(run / "ensemble", run / "val.zarr", run / "results", EvaluateSettings(threads=1), show_progress=False)
                results[name][source] = metrics["miou"]
                print(name, source, metrics["miou"], flush=True)
    Path(arguments.out).write_text(json.dumps({"checkpoint": str(arguments.checkpoint), "validation_images": arguments.validation_images, "miou": results}, indent=1))


if __name__ == "__main__":
    main()
