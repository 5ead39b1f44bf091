"""Do the taps `select` chooses beat the paper's on the demo? Validation mIoU, per class, never the test split.

For each data seed, the demo's generator draws 20 labeled training faces (seed 0: the demo's own)
and validation faces of another seed. Both are extracted once with params.yaml's superset
(`extract.steps` × `extract.blocks`), `select` chooses from the training store alone, and for
each ensemble seed two ensembles train on the same store: on the selection and on the paper's
taps (`train.steps` × `train.blocks`). Results go to bench/results/demo_selection_validation.json.

    python -m bench.demo_selection_validation [--data-seeds 0,1] [--seeds 0,1] [--validation-images 64]
"""

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from bench.common import PROJECT_ROOT
from bench.demo_checkpoint_validation import write_validation_data
from pipeline.config import EvaluateSettings, load_params
from pipeline.evaluation.evaluate import evaluate_on_store
from pipeline.extraction.extract import extract_features
from pipeline.heads.pixel_ensemble.training import train_on_store
from pipeline.heads.selection import select_into_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(PROJECT_ROOT / "data" / "checkpoints" / "demo_ddpm"))
    parser.add_argument("--data-seeds", default="0,1", help="Demo data seeds (training faces), comma-separated.")
    parser.add_argument("--seeds", default="0,1", help="Ensemble seeds, comma-separated.")
    parser.add_argument("--validation-images", type=int, default=64)
    parser.add_argument("--out", default=str(PROJECT_ROOT / "bench" / "results" / "demo_selection_validation.json"))
    arguments = parser.parse_args()
    params = load_params(PROJECT_ROOT / "params.yaml")
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for data_seed in map(int, arguments.data_seeds.split(",")):
            run_dir = Path(scratch) / f"data-{data_seed}"
            data = write_validation_data(run_dir, dataclasses.replace(params.demo, seed=data_seed), arguments.validation_images)
            for images, store in ((data.train_images, "train.zarr"), (data.validation_images, "val.zarr")):
                extract_features(arguments.checkpoint, images, run_dir / store, params.extract, data.classes,
                                 show_progress=False)
            started = time.perf_counter()
            selection = select_into_folder(run_dir / "train.zarr", run_dir / "selection", params.select, data.classes,
                                           show_progress=False)
            select_seconds = time.perf_counter() - started
            taps = {"selected": (selection.steps, selection.taps), "paper": (params.train.steps, params.train.blocks)}
            scores = {name: [] for name in taps}
            for seed in map(int, arguments.seeds.split(",")):
                for name, (steps, blocks) in taps.items():
                    settings = dataclasses.replace(params.train, seed=seed, steps=steps, blocks=blocks)
                    ensemble = run_dir / f"ensemble-{name}-{seed}"
                    train_on_store(run_dir / "train.zarr", ensemble, settings, show_progress=False)
                    metrics = evaluate_on_store(ensemble, run_dir / "val.zarr", run_dir / f"results-{name}-{seed}",
                                                EvaluateSettings(threads=1, pictures=0), show_progress=False)
                    scores[name].append({"seed": seed, "miou": metrics["miou"], "per_class_iou": metrics["per_class_iou"]})
            run = {
                "data_seed": data_seed, "select_seconds": round(select_seconds, 1),
                "selection": {"steps": selection.steps, "taps": selection.taps,
                              "validation_miou_probe": selection.validation_miou},
                **scores,
                "gain_points": [round(100 * (s["miou"] - p["miou"]), 2) for s, p in zip(scores["selected"], scores["paper"])],
                "worst_class_gain_points": [
                    round(min(100 * (s["per_class_iou"][k] - p["per_class_iou"][k]) for k in p["per_class_iou"]
                              if s["per_class_iou"][k] is not None and p["per_class_iou"][k] is not None), 2)
                    for s, p in zip(scores["selected"], scores["paper"])
                ],
            }
            print(json.dumps({key: run[key] for key in ("data_seed", "select_seconds", "gain_points",
                                                        "worst_class_gain_points")}), flush=True)
            runs.append(run)
    Path(arguments.out).write_text(json.dumps({
        "checkpoint": str(arguments.checkpoint), "validation_images": arguments.validation_images,
        "candidates": {"steps": params.extract.steps, "blocks": params.extract.blocks}, "runs": runs,
    }, indent=1) + "\n")


if __name__ == "__main__":
    main()
