"""Does the mask-prior refiner help on the demo? Validation mIoU before and after refinement, per class.

Never the test split: the demo's 20 labeled training faces (data seed 0, or others) and
validation faces of another seed are extracted with params.yaml's superset, `select` chooses the
taps from the training store, the headline ensemble trains on them and predicts the validation
faces. Refiners are trained on the training store (out-of-fold or in-fold first predictions,
with and without the feature projection) and refine those predictions with several schedules.
Results go to bench/results/demo_refine_validation.json.

    python -m bench.demo_refine_validation [--data-seeds 0,1] [--iterations 2000] [--refiners in_fold,out_of_fold]
"""

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from bench.common import PROJECT_ROOT
from bench.demo_checkpoint_validation import write_validation_data
from pipeline.config import load_params
from pipeline.evaluation.predict import predict_store
from pipeline.evaluation.scoring import score_predictions
from pipeline.extraction.extract import extract_features
from pipeline.heads.pixel_ensemble.training import train_on_store
from pipeline.heads.selection import select_into_folder
from pipeline.refine.refining import refine_predictions
from pipeline.refine.training import train_refiner

REFINERS = {  # name → RefineSettings changes
    "out_of_fold": {"first_prediction": "out_of_fold"},
    "in_fold": {"first_prediction": "in_fold"},
    "in_fold_probabilities_only": {"first_prediction": "in_fold", "projection_dims": 0},
    "out_of_fold_probabilities_only": {"first_prediction": "out_of_fold", "projection_dims": 0},
}
SCHEDULES = [[1], [3, 1], [5, 3, 1], [8, 5, 3, 1], [10, 7, 4, 1]]


def _scored(predictions, store) -> dict:
    metrics = score_predictions(predictions, store, "paper", show_progress=False)
    return {"miou": metrics["miou"], "per_class_iou": metrics["per_class_iou"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(PROJECT_ROOT / "data" / "checkpoints" / "demo_ddpm"))
    parser.add_argument("--data-seeds", default="0,1")
    parser.add_argument("--validation-images", type=int, default=64)
    parser.add_argument("--iterations", type=int, help="Refiner training iterations (default: params.yaml).")
    parser.add_argument("--refiners", default="out_of_fold,in_fold,in_fold_probabilities_only",
                        help=f"Refiner variants, comma-separated, of {sorted(REFINERS)}.")
    parser.add_argument("--out", default=str(PROJECT_ROOT / "bench" / "results" / "demo_refine_validation.json"))
    arguments = parser.parse_args()
    params = load_params(PROJECT_ROOT / "params.yaml")
    refine = params.refine if arguments.iterations is None else dataclasses.replace(params.refine, iterations=arguments.iterations)
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for data_seed in map(int, arguments.data_seeds.split(",")):
            run_dir = Path(scratch) / f"data-{data_seed}"
            data = write_validation_data(run_dir, dataclasses.replace(params.demo, seed=data_seed), arguments.validation_images)
            train_store, val_store = run_dir / "train.zarr", run_dir / "val.zarr"
            for images, store in ((data.train_images, train_store), (data.validation_images, val_store)):
                extract_features(arguments.checkpoint, images, store, params.extract, data.classes, show_progress=False)
            selection = select_into_folder(train_store, run_dir / "selection", params.select, data.classes, show_progress=False)
            train = dataclasses.replace(params.train, steps=selection.steps, blocks=selection.taps)
            started = time.perf_counter()
            train_on_store(train_store, run_dir / "ensemble", train, show_progress=False)
            predictions = predict_store(run_dir / "ensemble", val_store, run_dir / "predictions.zarr", show_progress=False)
            ensemble_seconds = time.perf_counter() - started
            run = {"data_seed": data_seed, "ensemble": _scored(predictions, val_store), "refined": {}}
            print(json.dumps({"data_seed": data_seed, "ensemble_miou": run["ensemble"]["miou"]}), flush=True)
            for name in arguments.refiners.split(","):
                settings = dataclasses.replace(refine, **REFINERS[name])
                summary = train_refiner(run_dir / "ensemble", train_store, run_dir / f"refiner-{name}", settings, train,
                                        show_progress=False)
                for schedule in SCHEDULES:
                    started = time.perf_counter()
                    refined = refine_predictions(run_dir / f"refiner-{name}", run_dir / "predictions.zarr", val_store,
                                                 run_dir / "refined.zarr", schedule, settings.seed, show_progress=False)
                    scored = _scored(refined, val_store)
                    gains = [scored["per_class_iou"][k] - run["ensemble"]["per_class_iou"][k]
                             for k in scored["per_class_iou"] if scored["per_class_iou"][k] is not None]
                    entry = {"miou": scored["miou"], "gain_points": round(100 * (scored["miou"] - run["ensemble"]["miou"]), 2),
                             "worst_class_gain_points": round(100 * min(gains), 2), "per_class_iou": scored["per_class_iou"],
                             "refine_seconds": round(time.perf_counter() - started, 2),
                             "refiner_training_seconds": round(summary.seconds, 1),
                             "first_prediction_miou_on_training": summary.first_prediction_miou}
                    run["refined"][f"{name}; schedule {schedule}"] = entry
                    print(json.dumps({"refiner": name, "schedule": schedule, **{k: entry[k] for k in (
                        "miou", "gain_points", "worst_class_gain_points", "refine_seconds")}}), flush=True)
            run["ensemble_train_and_predict_seconds"] = round(ensemble_seconds, 1)
            runs.append(run)
    out = Path(arguments.out)
    earlier = json.loads(out.read_text())["runs"] if out.is_file() else []  # other data seeds' runs stay
    runs = sorted([run for run in earlier if run["data_seed"] not in {run["data_seed"] for run in runs}] + runs,
                  key=lambda run: run["data_seed"])
    out.write_text(json.dumps({
        "checkpoint": str(arguments.checkpoint), "validation_images": arguments.validation_images,
        "refine": dataclasses.asdict(refine), "runs": runs,
    }, indent=1) + "\n")


if __name__ == "__main__":
    main()
