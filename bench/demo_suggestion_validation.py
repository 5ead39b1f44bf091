"""Does `suggest` pay? Active labeling rounds on validation faces of the demo (never the test split).

Faces of the validation seed (the demo's seed + VALIDATION_SEED_OFFSET): a pool of labeled faces
(their labels play the person who annotates) and validation faces to score on. Per draw, 5
faces of the pool start labeled; then three rounds: train an ensemble on the labeled faces,
score it on the validation faces, and let a strategy pick 5 more of the rest (uncertainty,
diverse or random, as `suggest` does: `pipeline.suggestion.choose_images`); a last ensemble is
scored after the third round (5, 10, 15, 20 labeled faces). Every strategy starts from the same
first ensemble of a draw. The ensembles: the demo's selected taps (data/selection/selection.json),
`train`'s settings with the fast protocol and `--members` members. Results, mIoU and per-class
IoU per round, strategy and draw: bench/results/demo_suggestion_validation.json.

    python -m bench.demo_suggestion_validation [--draws 0,1] [--pool 65] [--members 5]
"""

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import PROJECT_ROOT
from bench.demo_checkpoint_validation import VALIDATION_SEED_OFFSET
from pipeline.config import load_params
from pipeline.data.demo import write_demo_dataset
from pipeline.data.folders import find_class_info
from pipeline.evaluation.learning_curve import score_on_store
from pipeline.evaluation.predict import predict_image
from pipeline.extraction.extract import extract_features
from pipeline.heads.pixel_ensemble.training import train_on_store
from pipeline.heads.selection_file import read_selection
from pipeline.runtime.devices import torch_threads
from pipeline.store.reader import FeatureStore
from pipeline.suggestion import STRATEGIES, choose_images, pooled_features

START, ADDED, ROUNDS = 5, 5, 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(PROJECT_ROOT / "data" / "checkpoints" / "demo_ddpm"))
    parser.add_argument("--selection", default=str(PROJECT_ROOT / "data" / "selection" / "selection.json"))
    parser.add_argument("--draws", default="0,1", help="Seeds of the starting faces, comma-separated.")
    parser.add_argument("--pool", type=int, default=65, help="Labeled faces to choose from (the start included).")
    parser.add_argument("--validation-images", type=int, default=64)
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--out", default=str(PROJECT_ROOT / "bench" / "results" / "demo_suggestion_validation.json"))
    arguments = parser.parse_args()
    params = load_params(PROJECT_ROOT / "params.yaml")
    steps, taps = read_selection(arguments.selection)
    train = dataclasses.replace(params.train, protocol="fast", members=arguments.members, steps=steps, blocks=taps,
                                threads=1)
    started = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory() as scratch, torch_threads(1):
        scratch = Path(scratch)
        spec = dataclasses.replace(params.demo, seed=params.demo.seed + VALIDATION_SEED_OFFSET, pool_images=0,
                                   train_images=arguments.pool, test_images=arguments.validation_images)
        write_demo_dataset(spec, scratch / "faces")
        classes = find_class_info(scratch / "faces" / "real" / "train")
        for split in ("train", "test"):
            extract_features(arguments.checkpoint, scratch / "faces" / "real" / split, scratch / f"{split}.zarr",
                             dataclasses.replace(params.extract, steps=steps, blocks=taps), classes, show_progress=False)
        pool = FeatureStore(scratch / "train.zarr", 1024, steps, taps)
        validation = FeatureStore(scratch / "test.zarr", 1024, steps, taps)
        embeddings = np.stack([pooled_features(pool, index) for index in range(pool.num_images)])

        def trained_and_scored(labeled: list[int], name: str):
            ensemble, _ = train_on_store(scratch / "train.zarr", scratch / name, train, show_progress=False,
                                         images=sorted(labeled))
            return ensemble, score_on_store(ensemble, validation)

        for draw in map(int, arguments.draws.split(",")):
            start = [int(index) for index in np.random.default_rng([draw, 1]).permutation(pool.num_images)[:START]]
            first, first_scores = trained_and_scored(start, f"draw{draw}-start")
            for strategy in STRATEGIES:
                labeled, ensemble, scores = list(start), first, first_scores
                rounds = [{"labeled": len(labeled), **scores}]
                for round_index in range(ROUNDS):
                    rest = [index for index in range(pool.num_images) if index not in labeled]
                    uncertainty = np.array([predict_image(ensemble, pool, index, 16384).uncertainty for index in rest])
                    chosen = choose_images(uncertainty, embeddings[rest], ADDED, strategy, seed=1000 * draw + round_index)
                    labeled += [rest[position] for position in chosen]
                    ensemble, scores = trained_and_scored(labeled, f"draw{draw}-{strategy}-{round_index}")
                    rounds.append({"labeled": len(labeled), "added": [pool.image_names[rest[p]] for p in chosen], **scores})
                runs.append({"draw": draw, "strategy": strategy, "rounds": rounds})
                print(json.dumps({"draw": draw, "strategy": strategy,
                                  "miou": [row["miou"] for row in rounds]}), flush=True)
    summary = {}
    for strategy in STRATEGIES:
        per_draw = np.array([[row["miou"] for row in run["rounds"]] for run in runs if run["strategy"] == strategy])
        summary[strategy] = {"labeled": [START + ADDED * k for k in range(ROUNDS + 1)],
                             "miou_mean": per_draw.mean(axis=0).round(4).tolist(),
                             "miou_std": per_draw.std(axis=0).round(4).tolist()}
    Path(arguments.out).write_text(json.dumps({
        "what": __doc__.splitlines()[0], "checkpoint": arguments.checkpoint, "selection": {"steps": steps, "taps": taps},
        "pool": arguments.pool, "validation_images": arguments.validation_images, "members": arguments.members,
        "protocol": "fast", "seconds": round(time.perf_counter() - started), "summary": summary, "runs": runs,
    }, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
