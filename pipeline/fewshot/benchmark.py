"""The few-shot benchmark of a set of fold models: DiffewS beside its three baselines, on the
same episodes of every fold, averaged over the folds.

A models folder holds one DiffewS model per fold (`fewshot-train`'s output folders), and, for
baseline (c), the same fine-tuning from random weights:

    MODELS/pretrained/fold-0/   fewshot.json, model.safetensors, …
    MODELS/pretrained/fold-1/   …
    MODELS/random-init/fold-0/  (optional)

Each fold's novel classes are those its pretrained model was trained without (its fewshot.json),
so the benchmark cannot score a class a model has seen. Per fold it scores, with
`evaluate_fewshot` and `evaluate_fewshot_baseline` on one episode sequence (seeded by
`settings.seed`, so every method meets the same queries and supports):

- `diffews_{k}shot`: the pretrained model with k supports, for each k in `shots`;
- `prototype_1shot` (a) and `ensemble_1shot` (b): the frozen checkpoint's features;
- `random_init_1shot` (c): the random-weights model, where there is one.

`metrics.json` holds every method's mIoU per fold and its mean over the folds, per-class IoU
(each class is novel in one fold), FB-IoU, and the headline numbers under "metrics"
(`fewshot_miou_1shot`, …, the margins in points); `fewshot.png` draws the per-class IoU of every
method; each run's own metrics.json and episodes.png lie in `runs/fold-F/METHOD/`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.config import FewShotSettings
from pipeline.fewshot.baselines import FeatureCache
from pipeline.fewshot.evaluation import evaluate_fewshot, evaluate_fewshot_baseline
from pipeline.fewshot.training import RECORD_FILE
from pipeline.runtime.atomic import replaced_file

PRETRAINED, RANDOM_INIT = "pretrained", "random-init"
SUMMARY_FILE = "metrics.json"
CHART_FILE = "fewshot.png"
RUNS_FOLDER = "runs"
_FOLD_FOLDER = re.compile(r"fold-(\d+)")
# Method → (its key in data/metrics.json, its label in the chart).
METHOD_NAMES = {
    "diffews_1shot": ("fewshot_miou_1shot", "DiffewS, 1 shot"),
    "diffews_5shot": ("fewshot_miou_5shot", "DiffewS, 5 shots"),
    "prototype_1shot": ("fewshot_prototype_miou_1shot", "(a) prototype matching, 1 shot"),
    "ensemble_1shot": ("fewshot_ensemble_miou_1shot", "(b) MLP ensemble on the support, 1 shot"),
    "random_init_1shot": ("fewshot_random_init_miou_1shot", "(c) DiffewS from random weights, 1 shot"),
}


def find_fold_models(models_dir: str | Path) -> dict[int, dict[str, Path]]:
    """Fold → {"pretrained": folder, "random-init": folder (where there is one)}.

    Raises:
        ValueError: no `pretrained/fold-F` model folder, or a random-init fold without its
            pretrained one.
    """
    models_dir = Path(models_dir)
    found: dict[str, dict[int, Path]] = {}
    for kind in (PRETRAINED, RANDOM_INIT):
        folders = sorted((models_dir / kind).glob("fold-*")) if (models_dir / kind).is_dir() else []
        found[kind] = {int(match.group(1)): folder for folder in folders
                       if (match := _FOLD_FOLDER.fullmatch(folder.name)) and (folder / RECORD_FILE).is_file()}
    if not found[PRETRAINED]:
        raise ValueError(f"{models_dir} holds no few-shot model as {PRETRAINED}/fold-F/{RECORD_FILE}")
    orphans = sorted(set(found[RANDOM_INIT]) - set(found[PRETRAINED]))
    if orphans:
        raise ValueError(f"{models_dir}/{RANDOM_INIT} has folds {orphans} that {PRETRAINED}/ lacks")
    return {fold: {PRETRAINED: folder} | ({RANDOM_INIT: found[RANDOM_INIT][fold]} if fold in found[RANDOM_INIT] else {})
            for fold, folder in found[PRETRAINED].items()}


def novel_classes(model_dir: Path) -> list[str]:
    """The classes a few-shot model was trained without (its fewshot.json's test classes)."""
    return list(json.loads((model_dir / RECORD_FILE).read_text())["fold"]["test_classes"])


def benchmark_fewshot(
    models_dir: str | Path,
    checkpoint: str | Path,
    images_dir: str | Path,
    out_dir: str | Path,
    settings: FewShotSettings,
    shots: Sequence[int] = (1, 5),
    show_progress: bool = True,
) -> dict:
    """Scores every fold's models and the baselines (module docstring); returns metrics.json's content.

    Args:
        models_dir: the fold models (module docstring).
        checkpoint: the frozen diffusion model the baselines read (the one the models were
            fine-tuned from).
        images_dir: a labeled folder holding every fold's novel classes.
        out_dir: where the runs and the summary go.
        settings: episodes, seed, threshold, device, threads, the baselines' features and budget
            (the fold and shots are set per run).
        shots: the DiffewS model's support counts; the baselines run 1-shot.

    Raises:
        ValueError: see `find_fold_models`; a random-init model of other novel classes than its
            fold's pretrained one; and what `evaluate_fewshot` raises.
    """
    out_dir = Path(out_dir)
    folds = find_fold_models(models_dir)
    # One cache of the frozen features for every fold's baselines: the folds share the images.
    cache = FeatureCache(checkpoint, settings.baseline_steps, settings.baseline_blocks, settings.seed, settings.device)
    runs: dict[int, dict[str, dict]] = {}
    for fold, models in folds.items():
        novel = novel_classes(models[PRETRAINED])
        if RANDOM_INIT in models and sorted(novel_classes(models[RANDOM_INIT])) != sorted(novel):
            raise ValueError(f"{models[RANDOM_INIT]} was trained for the novel classes "
                             f"{novel_classes(models[RANDOM_INIT])}, {models[PRETRAINED]} for {novel}")
        one_shot = dataclasses.replace(settings, novel_classes=novel, shots=1)
        fold_dir = out_dir / RUNS_FOLDER / f"fold-{fold}"
        runs[fold] = {}
        for count in shots:
            runs[fold][f"diffews_{count}shot"] = evaluate_fewshot(
                models[PRETRAINED], images_dir, fold_dir / f"diffews-{count}shot",
                dataclasses.replace(one_shot, shots=count), show_progress)
        for baseline in ("prototype", "ensemble"):
            runs[fold][f"{baseline}_1shot"] = evaluate_fewshot_baseline(
                baseline, checkpoint, images_dir, fold_dir / f"{baseline}-1shot", one_shot, show_progress, cache=cache)
        if RANDOM_INIT in models:
            runs[fold]["random_init_1shot"] = evaluate_fewshot(
                models[RANDOM_INIT], images_dir, fold_dir / "random-init-1shot", one_shot, show_progress)
    summary = summarise(runs) | {"episodes_per_fold": settings.episodes, "seed": settings.seed,
                                 "models": str(Path(models_dir)), "checkpoint": str(Path(checkpoint)),
                                 "images": str(Path(images_dir))}
    with replaced_file(out_dir / SUMMARY_FILE) as staging:
        staging.write_text(json.dumps(summary, indent=1))
    with replaced_file(out_dir / CHART_FILE) as staging:
        save_fewshot_chart(staging, summary, f"few-shot segmentation of novel classes, {len(runs)} folds")
    return summary


def summarise(runs: dict[int, dict[str, dict]]) -> dict:
    """Fold → method → a run's metrics.json  ⟶  the benchmark's summary (module docstring).

    A method's mIoU is the mean over the folds of each fold's mIoU (the COCO-20i convention); a
    method missing from a fold (no random-init model there) is averaged over the folds it has.
    """
    methods: dict[str, dict] = {}
    for fold, by_method in sorted(runs.items()):
        for method, metrics in by_method.items():
            entry = methods.setdefault(method, {"per_fold": {}, "fb_iou_per_fold": {}, "per_class_iou": {},
                                                "classes_per_fold": {}, "seconds_per_episode": {}})
            entry["per_fold"][str(fold)] = round(metrics["miou"], 4)
            entry["fb_iou_per_fold"][str(fold)] = round(metrics["fb_iou"], 4)
            entry["per_class_iou"] |= {name: round(value, 4) for name, value in metrics["per_class_iou"].items()}
            entry["classes_per_fold"][str(fold)] = list(metrics["per_class_iou"])
            entry["seconds_per_episode"][str(fold)] = round(metrics["seconds_per_episode"], 4)
    for entry in methods.values():
        entry["miou"] = round(float(np.mean(list(entry["per_fold"].values()))), 4)
        entry["fb_iou"] = round(float(np.mean(list(entry["fb_iou_per_fold"].values()))), 4)
    headline = {METHOD_NAMES[method][0]: entry["miou"] for method, entry in methods.items() if method in METHOD_NAMES}
    one_shot = methods.get("diffews_1shot")
    for baseline, name in (("prototype_1shot", "prototype"), ("ensemble_1shot", "ensemble"),
                           ("random_init_1shot", "random_init")):
        if one_shot and baseline in methods:
            headline[f"fewshot_margin_over_{name}"] = round(100 * (one_shot["miou"] - methods[baseline]["miou"]), 2)
    return {"metrics": headline, "methods": methods, "folds": sorted(runs)}


def save_fewshot_chart(path: Path, summary: dict, title: str) -> None:
    """Grouped bars: each novel class (its fold in brackets), one bar per method, and each
    method's mean over the folds in the legend."""
    methods = [method for method in METHOD_NAMES if method in summary["methods"]]
    classes = list(summary["methods"][methods[0]]["per_class_iou"])
    fold_of = {name: fold for fold, names in summary["methods"][methods[0]]["classes_per_fold"].items()
               for name in names}
    figure = Figure(figsize=(max(7.0, 1.1 * len(classes) + 2.0), 4.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    width = 0.8 / len(methods)
    positions = np.arange(len(classes))
    for number, method in enumerate(methods):
        entry = summary["methods"][method]
        values = [entry["per_class_iou"].get(name, 0.0) for name in classes]
        axes.bar(positions + (number - (len(methods) - 1) / 2) * width, values, width,
                 label=f"{METHOD_NAMES[method][1]}: {100 * entry['miou']:.1f}")
    axes.set_xticks(positions, [f"{name}\n(fold {fold_of.get(name, '?')})" for name in classes], fontsize=8)
    axes.set_ylabel("IoU of the novel class")
    axes.set_ylim(0.0, 1.0)
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8, title="method: mIoU, mean over folds", title_fontsize=8, loc="upper right")
    axes.set_title(title)
    figure.savefig(path, dpi=100, format="png")  # the staging name has no .png suffix
