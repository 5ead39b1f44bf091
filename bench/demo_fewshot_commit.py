"""Makes the committed demo few-shot models (data/checkpoints/demo_fewshot) from the validation
bench's trained runs of one variant: its model per fold (pretrained/fold-F) and the same from
random weights (random-init/fold-F), weights stored in float16 (half the size; they load as
float32), the backbone's path made relative, and recipe.json: the commands, the training data and
settings, each run's time, loss and validation scores (from bench/results/demo_fewshot_validation.json).

    python -m bench.demo_fewshot_validation --variants V,V-random-init --fold F   # for F in 0 1 2 3
    python -m bench.demo_fewshot_commit --variant V
"""

import argparse
import json
import shutil
from pathlib import Path

import safetensors.torch

from bench.common import PROJECT_ROOT
from bench.demo_fewshot_validation import RANDOM_INIT, STICKER_CLASSES, TRAINING_FACES, TRAINING_SEED, variant
from pipeline.fewshot.benchmark import PRETRAINED
from pipeline.fewshot.benchmark import RANDOM_INIT as RANDOM_INIT_FOLDER
from pipeline.fewshot.training import LOSS_PICTURE, LOSS_TABLE, MODEL_FILE, RECORD_FILE

FOLDS = 4
CHECKPOINT = "data/checkpoints/demo_ddpm"


def copy_model(run: Path, out: Path) -> dict:
    """One trained run → a committed model folder; returns its record."""
    out.mkdir(parents=True)
    weights = safetensors.torch.load_file(run / MODEL_FILE)
    safetensors.torch.save_file({name: tensor.half() if tensor.is_floating_point() else tensor
                                 for name, tensor in weights.items()}, out / MODEL_FILE)
    record = json.loads((run / RECORD_FILE).read_text())
    record["backbone"]["checkpoint"] = CHECKPOINT  # trained from the committed DDPM (its sha256 is recorded)
    (out / RECORD_FILE).write_text(json.dumps(record, indent=1) + "\n")
    for name in (LOSS_TABLE, LOSS_PICTURE):
        shutil.copy(run / name, out / name)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", required=True)
    parser.add_argument("--random-init-variant", help="the random-init runs' variant, when not VARIANT-random-init "
                                                       "(e.g. the same recipe at fewer steps; recorded in recipe.json)")
    parser.add_argument("--scratch", default=str(PROJECT_ROOT / "runs" / "fewshot-validation"))
    parser.add_argument("--results", default=str(PROJECT_ROOT / "bench" / "results" / "demo_fewshot_validation.json"))
    parser.add_argument("--out", default=str(PROJECT_ROOT / "data" / "checkpoints" / "demo_fewshot"))
    arguments = parser.parse_args()
    scratch, out = Path(arguments.scratch), Path(arguments.out)
    measured = {(entry["variant"], entry["fold"]): entry
                for entry in json.loads(Path(arguments.results).read_text())["variants"]}
    if out.exists():
        shutil.rmtree(out)
    runs = {}
    random_init_variant = arguments.random_init_variant or arguments.variant + RANDOM_INIT
    for name, folder in ((arguments.variant, PRETRAINED), (random_init_variant, RANDOM_INIT_FOLDER)):
        for fold in range(FOLDS):
            record = copy_model(scratch / f"{name}-fold{fold}", out / folder / f"fold-{fold}")
            entry = measured[name, fold]
            runs[f"{folder}/fold-{fold}"] = {
                "novel_classes": record["fold"]["test_classes"], "steps": record["steps"],
                "final_loss": round(record["final_loss"], 5),
                "training_seconds": entry.get("training_seconds", entry["training_seconds_this_run"]),
                "validation_novel_miou": entry["novel"]["miou"], "validation_base_miou": entry["base"]["miou"]}
    settings, omitted, stickers = variant(arguments.variant)
    recipe = {
        "what": "DiffewS's demo models: the demo DDPM fine-tuned in context (KV fusion, a support stem, the query's "
                "mask in one step at t = 1) on generated labeled faces, one model per fold of the 7 face parts, with "
                "the fold's novel parts left out of every training face; random-init/ the same fine-tuning from "
                "random weights (baseline c). Chosen on validation faces (bench/results/demo_fewshot_validation.json); "
                "`dvc repro` scores them on the test faces (stage fewshot) and does not retrain them.",
        "commands": [f"python -m bench.demo_fewshot_validation --variants {arguments.variant},"
                     f"{random_init_variant} --fold {fold}" for fold in range(FOLDS)]
                    + [f"python -m bench.demo_fewshot_commit --variant {arguments.variant}"
                       + (f" --random-init-variant {random_init_variant}" if arguments.random_init_variant else "")],
        "variant": arguments.variant,
        "random_init_variant": random_init_variant,
        "training_faces": {"count": TRAINING_FACES, "seed": TRAINING_SEED, "novel_parts_omitted": omitted,
                           "sticker_classes": STICKER_CLASSES if stickers else 0, "sticker_radius": stickers},
        "settings": {key: value for key, value in record["settings"].items() if key != "random_init"} | settings,
        "checkpoint": CHECKPOINT,
        "checkpoint_sha256": record["backbone"]["checkpoint_sha256"],
        "weights": "float16 (trained in float32; they load as float32)",
        "training_machine": "one thread each of a 2-core AMD EPYC, two trainings at once",
        "runs": runs,
    }
    (out / "recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")
    print(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
