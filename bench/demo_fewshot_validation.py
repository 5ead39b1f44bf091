"""DiffewS on the demo faces: does in-context fine-tuning segment parts it never saw? Each
variant is a fine-tuning of the committed demo DDPM on generated labeled faces (the fold's base
parts only), scored on validation faces of another seed (never the test faces) on the fold's
novel parts and, to see that the training task was learned, on its base parts; beside it the
prototype baseline on the same episodes.

Variants (`--variants`, comma-separated; default all):
- `fine-all`: zero-initialised self-attention added at 16×16 and 8×8 (the demo UNet attends
  only at 4×4 and 2×2), the whole UNet fine-tuned (AdamW 2e-4);
- `fine-attention`: the same, only the self-attention layers, the support stem and the output
  head trained (1e-3), the pretrained convolutions frozen;
- `fine-all-omitted`: `fine-all` on training faces drawn without the novel parts at all
  (`write_faces(omit=…)`), so that training never shows them, even as background;
- `stickers`, `stickers-omitted`: `fine-all` and `fine-all-omitted` on faces that also carry 1 to 3
  stickers of 24 kinds (`write_faces(sticker_classes=24)`): 29 base classes instead of 5 (the
  split given by name, as the training faces have classes the validation faces lack);
- `large-stickers-omitted`: `stickers-omitted` with stickers of radius 2 to 9 pixels instead of
  2 to 3.5, so that training also shows region-sized classes (the novel skin and hair are);
- `balanced-stickers-omitted`, `balanced-large-stickers-omitted`: half the training episodes ask
  for a face part, half for a sticker (uniform over the classes, 24 sticker kinds drown the 3 to
  6 base parts: in `stickers-omitted` even the base parts reached only 0.14-0.31 on validation);
- `stickers-omitted-long`: `stickers-omitted` for 3,000 steps instead of 1,500;
- any of them with `-random-init` appended: the same from random weights (baseline c).

Training runs in --scratch and resumes; results go to
bench/results/demo_fewshot_validation.json (a variant measured again replaces its entry).

    python -m bench.demo_fewshot_validation [--variants fine-all,fine-all-omitted] [--fold 2] [--steps 1500]
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path

from bench.common import PROJECT_ROOT
from bench.demo_checkpoint_validation import VALIDATION_SEED_OFFSET
from pipeline.config import DemoSpec, FewShotSettings
from pipeline.data.demo import CLASS_NAMES, write_demo_dataset, write_faces
from pipeline.data.folders import find_class_info
from pipeline.fewshot.episodes import dataset_fold
from pipeline.fewshot.evaluation import evaluate_fewshot, evaluate_fewshot_baseline
from pipeline.fewshot.training import train_fewshot

TRAINING_FACES = 2000
TRAINING_SEED = 2000  # a stream no demo split uses
STICKER_CLASSES = 24
FINE_ALL = {"fine_attention": [16, 8], "trainable": "all", "learning_rate": 2e-4}
SMALL, LARGE = (2.0, 3.5), (2.0, 9.0)  # sticker radius ranges, pixels
# name → (settings, novel parts omitted from the training faces, sticker radius range or None)
VARIANTS = {
    "fine-all": (FINE_ALL, False, None),
    "fine-attention": ({"fine_attention": [16, 8], "trainable": "attention", "learning_rate": 1e-3}, False, None),
    "fine-all-omitted": (FINE_ALL, True, None),
    "stickers": (FINE_ALL, False, SMALL),
    "stickers-omitted": (FINE_ALL, True, SMALL),
    "large-stickers-omitted": (FINE_ALL, True, LARGE),
    "balanced-stickers-omitted": ({**FINE_ALL, "balanced": True}, True, SMALL),
    "balanced-large-stickers-omitted": ({**FINE_ALL, "balanced": True}, True, LARGE),
    "stickers-omitted-long": ({**FINE_ALL, "steps": 3000}, True, SMALL),
}
RANDOM_INIT = "-random-init"  # any variant with this suffix: the same from random weights (baseline c)


def variant(name: str) -> tuple[dict, bool, tuple[float, float] | None]:
    """(settings, novel parts omitted, sticker radius range) of a variant name."""
    settings, omitted, stickers = VARIANTS[name.removesuffix(RANDOM_INIT)]
    return ({**settings, "random_init": True} if name.endswith(RANDOM_INIT) else settings), omitted, stickers


def _scores(metrics: dict) -> dict:
    return {"miou": round(metrics["miou"], 4),
            "per_class_iou": {name: round(value, 3) for name, value in metrics["per_class_iou"].items()}}


def _read(out: Path) -> dict:
    return json.loads(out.read_text()) if out.is_file() else {"prototype": {}, "variants": []}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(PROJECT_ROOT / "data" / "checkpoints" / "demo_ddpm"))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--fold", type=int, default=2, help="of 4 interleaved folds (2: ear and mouth novel)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--scratch", default=str(PROJECT_ROOT / "runs" / "fewshot-validation"))
    parser.add_argument("--out", default=str(PROJECT_ROOT / "bench" / "results" / "demo_fewshot_validation.json"))
    arguments = parser.parse_args()
    scratch, out = Path(arguments.scratch), Path(arguments.out)
    base = FewShotSettings(folds=4, fold=arguments.fold, steps=arguments.steps, batch_size=arguments.batch_size,
                           episodes=arguments.episodes, device="cpu", threads=1)
    # Validation faces of another seed; training faces with every part, and without the novel ones.
    validation = scratch / "validation" / "real" / "test"
    if not validation.is_dir():
        spec = DemoSpec(size=32, pool_images=0, train_images=0, test_images=64, seed=VALIDATION_SEED_OFFSET)
        write_demo_dataset(spec, scratch / "validation")
    classes = find_class_info(validation)
    novel = dataset_fold(classes, 4, arguments.fold).test_classes
    novel_names = [classes.names[label] for label in novel]
    names = arguments.variants.split(",")
    faces = {}
    for omitted, stickers in {variant(name)[1:] for name in names}:
        folder = scratch / ("faces" + (f"-without-fold-{arguments.fold}" if omitted else "")
                            + ("-stickers" if stickers else "") + ("-large" if stickers == LARGE else ""))
        if not folder.is_dir():
            write_faces(folder, TRAINING_FACES, 32, TRAINING_SEED, omit=novel if omitted else (),
                        sticker_classes=STICKER_CLASSES if stickers else 0, sticker_radius=stickers or SMALL)
        faces[omitted, stickers] = folder
    prototype = evaluate_fewshot_baseline("prototype", arguments.checkpoint, validation, scratch / "prototype",
                                          base, show_progress=False)
    results = _read(out)
    results["prototype"][str(arguments.fold)] = {"episodes": arguments.episodes, **_scores(prototype)}
    out.write_text(json.dumps(results, indent=1) + "\n")
    for name in names:
        overrides, omitted, stickers = variant(name)
        overrides = dict(overrides)
        if overrides.pop("balanced", False):  # each base face part weighs as much as all stickers / their count
            parts = [part for part in CLASS_NAMES[1:] if part not in novel_names]
            overrides["class_weights"] = {part: STICKER_CLASSES / len(parts) for part in parts}
        settings = dataclasses.replace(base, **overrides, novel_classes=novel_names if stickers else None)
        model = scratch / f"{name}-fold{arguments.fold}"
        started = time.perf_counter()
        summary = train_fewshot(arguments.checkpoint, faces[omitted, stickers], model, settings, show_progress=False)
        entry = {"variant": name, "fold": arguments.fold, "settings": overrides, "novel_parts_omitted": omitted,
                 "sticker_classes": STICKER_CLASSES if stickers else 0, "sticker_radius": stickers,
                 "steps": settings.steps, "batch_size": settings.batch_size, "final_loss": round(summary.final_loss, 5),
                 "training_seconds_this_run": round(time.perf_counter() - started)}
        for classes in ("test", "train"):
            metrics = evaluate_fewshot(model, validation, model / f"validation-{classes}", settings, show_progress=False,
                                       classes=classes)
            entry["novel" if classes == "test" else "base"] = _scores(metrics)
        results = _read(out)  # again: another fold's run may have written meanwhile
        results["variants"] = [earlier for earlier in results["variants"]
                               if (earlier["variant"], earlier["fold"]) != (name, arguments.fold)] + [entry]
        print(json.dumps(entry), flush=True)
        out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
