"""Which steps and blocks suit the demo's small DDPM? mIoU on a validation split, per setting.

Validation faces come from another seed than the demo's splits (the test split is never
looked at). For each setting, the DDPM and the same UNet with random weights are compared with
the default training protocol. Results go to bench/results/demo_feature_sweep.json.

    python -m bench.demo_feature_sweep --checkpoint data/checkpoints/demo_ddpm
"""

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

from bench.common import PROJECT_ROOT
from bench.demo_checkpoint_validation import validation_miou, write_random_twin, write_validation_data
from pipeline.config import load_params

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
    every_tap = dataclasses.replace(params.train, steps=None, blocks=None)  # each setting's store is its own
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        data = write_validation_data(scratch, params.demo, arguments.validation_images)
        random_twin = write_random_twin(Path(arguments.checkpoint), params.baselines.random_weights_seed, scratch / "random_unet")
        for number, (name, (steps, blocks)) in enumerate(SETTINGS.items()):
            extract = dataclasses.replace(params.extract, steps=steps, blocks=blocks)
            results[name] = {
                source: validation_miou(weights, data, scratch / f"{number}-{source}", extract, [every_tap])[0]
                for source, weights in (("ddpm", Path(arguments.checkpoint)), ("random", random_twin))
            }
            print(name, results[name], flush=True)
    Path(arguments.out).write_text(json.dumps({"checkpoint": str(arguments.checkpoint), "validation_images": arguments.validation_images, "miou": results}, indent=1))


if __name__ == "__main__":
    main()
