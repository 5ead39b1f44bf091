"""Evaluating a trained few-shot model (DiffewS) on seeded episodes of a fold.

1. The model (`load_fewshot_model`) and the folder are checked against each other: the same
   class names, the fold it was trained for.
2. `episodes` episodes of `shots` shots are drawn with seed `seed` (the official protocol: 1,000
   per fold, seed 0) from the fold's test (novel) classes, or its training (base) classes to see
   whether the model learned its training task at all.
3. Each query's prediction (latents decoded first, for a latent model) is thresholded relative to
   its maximum (`decode_masks`) and scored (`FewShotScores`: per-class IoU, mIoU, FB-IoU).
4. `metrics.json` holds the scores with the fold, shots, episodes and seconds per episode;
   `episodes.png` the first few episodes: support with its mask, query, ground truth, prediction.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from pipeline.config import FewShotSettings, TrainSettings
from pipeline.fewshot.baselines import FeatureCache, baseline_predictor
from pipeline.fewshot.episodes import Episode, EpisodeInputs, load_episode, make_episodes
from pipeline.fewshot.metrics import FewShotScores
from pipeline.fewshot.training import (
    ClassChoice,
    EpisodeData,
    FewShotModel,
    episode_data,
    load_fewshot_model,
    model_inputs,
    predict_masks,
)
from pipeline.runtime.atomic import replaced_file
from pipeline.runtime.devices import pick_device, torch_threads
from pipeline.sources.loading import native_image_size

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
EPISODES_PICTURE = "episodes.png"
PICTURED_EPISODES = 4
OVERLAY_COLOUR = np.array([230, 40, 40], dtype=np.float32)  # the support's mask, over its image


def evaluate_fewshot(
    model_dir: str | Path,
    images_dir: str | Path,
    out_dir: str | Path,
    settings: FewShotSettings,
    show_progress: bool = True,
    classes: ClassChoice = "test",
) -> dict:
    """Scores a few-shot model on `settings.episodes` seeded episodes (see the module docstring).

    Args:
        model_dir: `train_fewshot`'s output folder.
        images_dir: a labeled folder with the same classes.json names as the training folder.
        out_dir: where metrics.json and episodes.png go.
        settings: folds and fold (those of the training), shots, episodes, threshold, seed,
            image_size (None: the training's), min_pixels, device, threads.
        show_progress: a progress bar over the episodes.
        classes: "test": the fold's novel classes (the protocol); "train": its base classes.

    Returns:
        The metrics written: miou, fb_iou, per_class_iou, episodes_per_class, episodes, and the
        run's fold, classes, shots, threshold, seed, image size, seconds per episode.

    Raises:
        ValueError: another fold than the model's, novel classes it was trained on (by name: the
            folder may have other classes than the training's), a class that fewer than shots + 1
            images hold.
    """
    started = time.perf_counter()
    # 1. The model and the data, checked against each other.
    loaded = load_fewshot_model(model_dir)
    record = loaded.record
    _check_fold(record, settings, model_dir)
    size = settings.image_size if settings.image_size is not None else record["image_size"]
    data = episode_data(images_dir, settings, size, classes, settings.shots)
    trained = set(record["fold"]["train_classes"])
    asked = [data.classes.names[label] for label in data.episode_classes]
    if classes == "test" and trained & set(asked):
        raise ValueError(f"the model in {model_dir} was trained on {sorted(trained & set(asked))}, which "
                         f"{images_dir} would score as novel classes")
    # 2. The episodes, scored one at a time.
    device = pick_device(settings.device)
    _to_device(loaded, device)  # outside inference mode: the parameters stay ordinary tensors

    def predict(number: int, episode: Episode, inputs: EpisodeInputs) -> torch.Tensor:
        with torch.inference_mode():
            return predict_episode(loaded, inputs, settings.threshold, device)

    # 3. The outputs.
    return score_episodes(predict, data, settings, out_dir, {"model": str(Path(model_dir).resolve())}, classes,
                          show_progress, started)


def score_episodes(
    predict: Callable[[int, Episode, EpisodeInputs], torch.Tensor],
    data: EpisodeData,
    settings: FewShotSettings,
    out_dir: str | Path,
    provenance: dict,
    classes: ClassChoice = "test",
    show_progress: bool = True,
    started: float | None = None,
) -> dict:
    """Draws the run's episodes, scores `predict`'s masks of them and writes the outputs (steps 2-4
    of the module docstring); shared by DiffewS and the baselines, so they meet the same episodes.

    Args:
        predict: (episode number, episode, its inputs) → predicted query mask, bool (H, W).
        provenance: what made the predictions, recorded in metrics.json (e.g. {"model": …}).
    """
    started = time.perf_counter() if started is None else started
    episodes = make_episodes(data.index, data.episode_classes, settings.shots, count=settings.episodes,
                             seed=settings.seed, names=data.classes.names)
    scores = FewShotScores(data.episode_classes, data.classes.names)
    pictured = []
    bar = tqdm(episodes, desc="fewshot-evaluate", unit="episode", disable=not show_progress)
    with torch_threads(settings.threads), bar:
        for number, episode in enumerate(bar):
            inputs = load_episode(episode, data.records, data.classes, data.size)
            predicted = predict(number, episode, inputs).cpu()  # bool (H, W)
            scores.update(episode.class_index, predicted, inputs.query_mask, inputs.query_scored)
            if number < PICTURED_EPISODES:
                pictured.append((episode, inputs, predicted))
    seconds = time.perf_counter() - started
    metrics = scores.summary() | {
        "classes": classes, "folds": settings.folds, "fold": settings.fold, "shots": settings.shots,
        "threshold": settings.threshold, "seed": settings.seed, "image_size": data.size,
        "seconds_per_episode": seconds / len(episodes), **provenance,
    }
    _write_outputs(Path(out_dir), metrics, pictured, data.classes.names)
    fold = f"novel classes {', '.join(settings.novel_classes)}" if settings.novel_classes else f"fold {settings.fold}"
    logger.info("few-shot %s classes, %s, %d-shot: mIoU %.4f, FB-IoU %.4f over %d episodes",
                classes, fold, settings.shots, metrics["miou"], metrics["fb_iou"], len(episodes))
    return metrics


def evaluate_fewshot_baseline(
    baseline: str,
    checkpoint: str | Path,
    images_dir: str | Path,
    out_dir: str | Path,
    settings: FewShotSettings,
    show_progress: bool = True,
    classes: ClassChoice = "test",
    cache: FeatureCache | None = None,
) -> dict:
    """Scores a baseline (`fewshot.baselines`: "prototype" or "ensemble") on the episodes
    `evaluate_fewshot` draws with the same settings, from the checkpoint's frozen features at
    `settings.baseline_steps` and `settings.baseline_blocks` (`cache`: a FeatureCache of those
    already made, shared between runs on the same images). Returns metrics.json's content."""
    started = time.perf_counter()
    if cache is None:
        cache = FeatureCache(checkpoint, settings.baseline_steps, settings.baseline_blocks, settings.seed, settings.device)
    size = settings.image_size if settings.image_size is not None else native_image_size(cache.source)
    data = episode_data(images_dir, settings, size, classes, settings.shots)
    ensemble = TrainSettings(members=settings.baseline_members, fast_min_steps=settings.baseline_training_steps,
                             fast_epochs=1e-6, device="cpu")  # a fixed budget of steps, whatever the shots
    predict = baseline_predictor(baseline, cache, ensemble)
    provenance = {"baseline": baseline, "checkpoint": str(Path(checkpoint).resolve()),
                  "feature_steps": list(settings.baseline_steps), "feature_blocks": list(settings.baseline_blocks)}
    return score_episodes(predict, data, settings, out_dir, provenance, classes, show_progress, started)


def predict_episode(loaded: FewShotModel, inputs: EpisodeInputs, threshold: float, device: torch.device) -> torch.Tensor:
    """One episode's predicted query mask, bool (H, W) on the CPU (latents: the posterior means)."""
    batch = model_inputs([inputs], loaded.vae, device)
    text = loaded.prompt_embeds.to(device) if loaded.prompt_embeds is not None else None
    return predict_masks(loaded.model, loaded.vae, text, batch, threshold)[0].cpu()


def _check_fold(record: dict, settings: FewShotSettings, model_dir) -> None:
    """Evaluating another split than the training's would score classes the model was trained on."""
    if settings.novel_classes:
        if sorted(settings.novel_classes) != sorted(record["fold"]["test_classes"]):
            raise ValueError(f"{model_dir} was trained with the novel classes {record['fold']['test_classes']}, "
                             f"not {settings.novel_classes}")
        return
    trained = (record["fold"]["folds"], record["fold"]["fold"])
    if trained != (settings.folds, settings.fold):
        raise ValueError(
            f"{model_dir} was trained for fold {trained[1]} of {trained[0]}, not fold {settings.fold} of "
            f"{settings.folds}: its training classes would be among the test classes"
        )


def _to_device(loaded: FewShotModel, device: torch.device) -> None:
    loaded.model.to(device)
    if loaded.vae is not None:
        loaded.vae.to(device)


def _write_outputs(out_dir: Path, metrics: dict, pictured: list, names) -> None:
    with replaced_file(out_dir / METRICS_FILE) as staging:
        staging.write_text(json.dumps(metrics, indent=1))
    with replaced_file(out_dir / EPISODES_PICTURE) as staging:
        save_episode_figure(staging, pictured, names)


def _as_picture(image: torch.Tensor) -> np.ndarray:
    """float32 (3, H, W) in [-1, 1] → uint8 (H, W, 3)."""
    return ((image.permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)


def _overlay(image: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """The image (3, H, W) with its mask (H, W) tinted red, uint8 (H, W, 3)."""
    picture = _as_picture(image).astype(np.float32)
    chosen = mask.numpy().astype(bool)
    picture[chosen] = 0.5 * picture[chosen] + 0.5 * OVERLAY_COLOUR
    return picture.astype(np.uint8)


def save_episode_figure(path: Path, pictured: list[tuple[Episode, EpisodeInputs, torch.Tensor]], names) -> None:
    """One row per episode: its first support with its mask | query | ground truth | prediction.

    Args:
        path: where the PNG goes.
        pictured: (episode, its loaded inputs, the predicted mask bool (H, W)) per row.
        names: the dataset's class names, to title the rows.
    """
    figure = Figure(figsize=(8.0, 2.0 * len(pictured) + 0.4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(pictured), 4, squeeze=False)
    for row, (episode, inputs, predicted) in enumerate(pictured):
        cells = (_overlay(inputs.support_images[0], inputs.support_masks[0]), _as_picture(inputs.query_image),
                 inputs.query_mask.numpy(), predicted.numpy())
        titles = (f"support ({len(episode.supports)} shot)", "query", "ground truth", "prediction")
        for column, (cell, title) in enumerate(zip(cells, titles, strict=True)):
            axes[row, column].imshow(cell, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            axes[row, column].set_xticks([])
            axes[row, column].set_yticks([])
            if row == 0:
                axes[row, column].set_title(title, fontsize=9)
        axes[row, 0].set_ylabel(names[episode.class_index], fontsize=9)
    figure.savefig(path, dpi=100, format="png")
