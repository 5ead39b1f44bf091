"""How many labeled images are enough: mIoU against the number of labeled training images.

For each feature source (a train store and a test store, with the steps and taps to read), the
ensemble is trained on `budget` labeled images for each budget, on several draws of which images
(draw d of budget b: a seeded permutation of the labeled images, the same images for every
source, so the sources are compared on equal footing), and scored on the whole test store. The
features are read from the stores: each point only trains and predicts, nothing is extracted.
A budget at least the number of labeled images is drawn once (every draw would be the same).

The result: per source and budget, mIoU mean and standard deviation over the draws, per-class
IoU means, and every draw's images and score; the picture: mIoU against labeled images (log
scale), one line per source, a band of ± one standard deviation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from pipeline.config import LearningCurveSettings, TrainSettings
from pipeline.evaluation.predict import predict_image
from pipeline.heads.pixel_ensemble.ensemble import Ensemble
from pipeline.heads.pixel_ensemble.training import train_on_store
from pipeline.metrics import IoUAccumulator
from pipeline.runtime.atomic import replaced_file
from pipeline.store.reader import FeatureStore

TEST_CACHE_MEGABYTES = 2048


@dataclasses.dataclass(frozen=True)
class CurveSource:
    """A feature source of the curve: its stores and the steps and taps of them to read
    (None: all the store holds)."""

    train_store: Path
    test_store: Path
    steps: list[int] | None = None
    blocks: list[int | str] | None = None


def draws_of_images(labeled: list[int], budget: int, draws: int, seed: int) -> list[list[int]]:
    """Which images each draw of a budget trains on (store indices, sorted)."""
    if budget >= len(labeled):
        return [sorted(labeled)]
    return [sorted(int(labeled[position]) for position in np.random.default_rng([seed, budget, draw]).permutation(len(labeled))[:budget])
            for draw in range(draws)]


def learning_curve(sources: Mapping[str, CurveSource], settings: LearningCurveSettings,
                   train: TrainSettings, show_progress: bool = True) -> dict:
    """Trains and scores every (source, budget, draw); returns the curve (module docstring).
    `train`: the ensembles' settings but members and protocol (`settings`') and steps and taps (each source's).

    Raises:
        ValueError: a source whose train store has no labeled image, or sources whose train
            stores hold other images (the draws must mean the same images everywhere).
    """
    names = None
    curve: dict = {"budgets": list(settings.budgets), "draws": settings.draws, "seed": settings.seed,
                   "members": settings.members, "protocol": settings.protocol, "iou": "paper", "sources": {}}
    for source_name, source in sources.items():
        store = FeatureStore(source.train_store, cache_megabytes=0)
        if names is not None and store.image_names != names:
            raise ValueError(f"{source.train_store} holds other images than the first source's train store; "
                             "a learning curve compares sources on the same draws of images")
        names = store.image_names
        labeled = [index for index in np.flatnonzero(store.done_mask()) if store.labels(int(index)) is not None]
        if not labeled:
            raise ValueError(f"{source.train_store} has no labeled image to learn from")
        source_train = dataclasses.replace(train, steps=source.steps, blocks=source.blocks, members=settings.members,
                                           protocol=settings.protocol)
        # The test features are read once and kept (up to the cache's size): every point predicts them again.
        test_store = FeatureStore(source.test_store, TEST_CACHE_MEGABYTES, source.steps, source.blocks)
        points = []
        plan = [(budget, images) for budget in settings.budgets
                for images in draws_of_images([int(index) for index in labeled], budget, settings.draws, settings.seed)]
        for budget, images in tqdm(plan, desc=f"learning curve: {source_name}", unit="ensemble", disable=not show_progress):
            with tempfile.TemporaryDirectory(prefix="segcache-curve-") as folder:
                ensemble, _ = train_on_store(source.train_store, folder, source_train, show_progress=False, images=images)
            scores = score_on_store(ensemble, test_store)
            points.append({"budget": budget, "images": [names[index] for index in images], **scores})
        curve["sources"][source_name] = {"points": points, "by_budget": _by_budget(points, ensemble.class_names)}
    return curve


def score_on_store(ensemble: Ensemble, store: FeatureStore) -> dict:
    """mIoU (the paper's definition) and per-class IoU of an ensemble on a store's labeled images
    (the store opened at the ensemble's steps and taps)."""
    accumulator = IoUAccumulator(len(ensemble.class_names), ensemble.ignore_label)
    for index in np.flatnonzero(store.done_mask()):
        labels = store.labels(int(index))
        if labels is not None:
            accumulator.update(predict_image(ensemble, store, int(index), 16384).labels, labels)
    per_class = accumulator.per_class_iou("paper")
    return {"miou": round(accumulator.mean_iou("paper"), 4),
            "per_class_iou": {name: round(float(value), 4) for name, value in zip(ensemble.class_names, per_class)
                              if not math.isnan(value)}}


def _by_budget(points: list[dict], class_names: list[str]) -> list[dict]:
    rows = []
    for budget in sorted({point["budget"] for point in points}):
        scores = [point for point in points if point["budget"] == budget]
        mious = np.array([point["miou"] for point in scores])
        rows.append({
            "budget": budget, "draws": len(scores), "miou_mean": round(float(mious.mean()), 4),
            "miou_std": round(float(mious.std()), 4),
            "per_class_iou_mean": {name: round(float(np.mean([point["per_class_iou"][name] for point in scores])), 4)
                                   for name in class_names if name in scores[0]["per_class_iou"]},
        })
    return rows


def write_learning_curve(curve: dict, out_json: Path, out_png: Path) -> None:
    """The curve as JSON and as a picture (each whole or not at all)."""
    with replaced_file(out_json) as staging:
        staging.write_text(json.dumps(curve, indent=1))
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name, source in curve["sources"].items():
        rows = source["by_budget"]
        budgets = np.array([row["budget"] for row in rows])
        mean, std = np.array([row["miou_mean"] for row in rows]), np.array([row["miou_std"] for row in rows])
        (line,) = axes.plot(budgets, mean, marker="o", label=name)
        axes.fill_between(budgets, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    axes.set_xscale("log")
    every_budget = sorted({row["budget"] for source in curve["sources"].values() for row in source["by_budget"]})
    axes.set_xticks(every_budget, [str(budget) for budget in every_budget])
    axes.set_xlabel("labeled training images")
    axes.set_ylabel("test mIoU")
    axes.set_title(f"Learning curve: mean ± std over up to {curve['draws']} draws of the images")
    axes.grid(alpha=0.3)
    axes.legend()
    with replaced_file(out_png) as staging:
        figure.savefig(staging, dpi=110, format="png")
