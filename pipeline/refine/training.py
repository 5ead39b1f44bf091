"""Training the refiner on the labeled images' first predictions ("diffusion on first prediction").

What gets noised is the segmenter's own prediction of a training image, not its ground truth,
and the refiner learns to output the ground truth: it learns to fix the segmenter's mistakes.
The ensemble has seen every labeled pixel, so its predictions of its own training images are
better than on new images and hide some of those mistakes. `first_prediction: out_of_fold`
therefore takes each training image's first prediction from an ensemble trained on the other
folds; on the demo's validation faces it did no better than the ensemble's own (in-fold)
predictions and cost k ensemble trainings, so in-fold is the default
(bench/results/demo_refine_validation.json).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from pipeline.config import RefineSettings, TrainSettings
from pipeline.evaluation.predict import ImagePrediction, open_store_for_ensemble, predict_image
from pipeline.heads.pixel_ensemble.ensemble import Ensemble, load_ensemble
from pipeline.heads.pixel_ensemble.training import train_on_store
from pipeline.metrics import IoUAccumulator
from pipeline.refine.conditioning import FeatureProjection, conditioning
from pipeline.refine.denoiser import MaskDenoiser
from pipeline.refine.mask_diffusion import MaskDiffusion
from pipeline.runtime.atomic import replaced_folder
from pipeline.runtime.devices import pick_device, torch_threads
from pipeline.store.reader import FeatureStore

logger = logging.getLogger(__name__)

REFINER_CONFIG, REFINER_WEIGHTS = "refiner.json", "refiner.safetensors"
IGNORED = -100  # cross-entropy's ignore index for unlabeled pixels
PIXELS_FOR_PROJECTION = 1000  # per training image, to fit the feature projection


@dataclasses.dataclass(frozen=True)
class RefinerTrainingSummary:
    refiner_dir: Path
    images: int
    first_prediction_miou: float  # of the first predictions the refiner trained on, on their images
    final_loss: float  # mean cross-entropy of the last 10 % of iterations
    seconds: float


def first_predictions(
    ensemble: Ensemble, store: FeatureStore, store_path: str | Path, train: TrainSettings, refine: RefineSettings,
    work_dir: Path,
) -> dict[int, ImagePrediction]:
    """Store index → the prediction of each labeled training image that the refiner learns to fix
    (`store`: the ensemble's features of the store at `store_path`)."""
    labeled = [int(index) for index in np.flatnonzero(store.done_mask()) if store.labels(int(index)) is not None]
    if refine.first_prediction == "in_fold":
        return {index: predict_image(ensemble, store, index, 16384) for index in labeled}
    if len(labeled) < refine.folds:
        raise ValueError(f"{store_path}: {len(labeled)} labeled images cannot make {refine.folds} folds")
    order = np.random.default_rng(refine.seed).permutation(labeled)
    folds = [sorted(order[fold:: refine.folds].tolist()) for fold in range(refine.folds)]
    settings = dataclasses.replace(train, steps=ensemble.features.steps, blocks=ensemble.features.taps)
    predictions = {}
    for number, held_out in enumerate(tqdm(folds, desc="refine: out-of-fold ensembles", unit="fold")):
        fold_dir = work_dir / f"fold-{number}"
        others = [index for index in labeled if index not in held_out]
        train_on_store(store_path, fold_dir, settings, store.class_info(), show_progress=False, images=others)
        fold_ensemble = load_ensemble(fold_dir)
        fold_store = open_store_for_ensemble(fold_ensemble, store_path, fold_dir)
        predictions.update({index: predict_image(fold_ensemble, fold_store, index, 16384) for index in held_out})
    return predictions


def _crop_and_flip(
    tensors: list[torch.Tensor], crop: float, flips: bool, generator: torch.Generator
) -> list[torch.Tensor]:
    """One random square crop (shared by the batch) and a horizontal flip per image, of tensors (B, ..., H, W)."""
    height, width = tensors[0].shape[-2:]
    side = max(8, round(min(height, width) * crop))
    top, left = (int(torch.randint(0, length - side + 1, (1,), generator=generator)) for length in (height, width))
    cropped = [tensor[..., top: top + side, left: left + side] for tensor in tensors]
    if not flips:
        return cropped
    flip = torch.rand(len(tensors[0]), generator=generator) < 0.5  # (B,)
    return [torch.where(flip.view(-1, *[1] * (tensor.dim() - 1)), tensor.flip(-1), tensor) for tensor in cropped]


def train_refiner(
    ensemble_dir: str | Path,
    store_path: str | Path,
    out_dir: str | Path,
    refine: RefineSettings,
    train: TrainSettings,
    show_progress: bool = True,
) -> RefinerTrainingSummary:
    """Trains a refiner for an ensemble on its training store and saves it to `out_dir`."""
    started = time.perf_counter()
    ensemble_dir = Path(ensemble_dir)
    ensemble = load_ensemble(ensemble_dir)
    store = open_store_for_ensemble(ensemble, store_path, ensemble_dir)
    with tempfile.TemporaryDirectory() as work_dir:
        first = first_predictions(ensemble, store, store_path, train, refine, Path(work_dir))
    indices = sorted(first)
    rng = np.random.default_rng(refine.seed)
    projection = FeatureProjection.fit(_sampled_features(store, indices, rng), refine.projection_dims, refine.seed)
    num_classes = ensemble.num_classes
    conditions = torch.stack([conditioning(first[index].mean_probabilities, projection.project_image(store, index))
                              for index in indices])  # (N, K + P, S, S)
    starts = torch.stack([torch.from_numpy(first[index].labels) for index in indices])  # (N, S, S)
    truths = torch.stack([torch.from_numpy(_training_labels(store.labels(index), num_classes)) for index in indices])
    first_miou = IoUAccumulator(num_classes, ensemble.ignore_label)
    for index in indices:
        first_miou.update(first[index].labels, store.labels(index))

    model, losses = fit_denoiser(conditions, starts, truths, num_classes, refine, show_progress)
    config = {
        "format": 1, "class_names": ensemble.class_names, "ignore_label": ensemble.ignore_label,
        "features": dataclasses.asdict(ensemble.features), "ensemble": str(ensemble_dir),
        "condition_channels": conditions.shape[1], "projection_dims": projection.dims,
        "diffusion_steps": refine.diffusion_steps, "width": refine.width, "first_prediction": refine.first_prediction,
        "first_prediction_miou": round(first_miou.mean_iou("ignore_excluded"), 6), "losses": losses[:: max(1, len(losses) // 200)],
    }
    tensors = {f"model.{name}": tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    tensors |= {"projection.weight": torch.from_numpy(np.ascontiguousarray(projection.weight)),
                "projection.bias": torch.from_numpy(np.ascontiguousarray(projection.bias))}
    with replaced_folder(Path(out_dir)) as staging:
        save_file(tensors, staging / REFINER_WEIGHTS)
        (staging / REFINER_CONFIG).write_text(json.dumps(config, indent=1))
    tail = losses[-max(1, len(losses) // 10):]
    return RefinerTrainingSummary(Path(out_dir), len(indices), config["first_prediction_miou"], float(np.mean(tail)),
                                  time.perf_counter() - started)


def fit_denoiser(
    conditions: torch.Tensor, starts: torch.Tensor, truths: torch.Tensor, num_classes: int, refine: RefineSettings,
    show_progress: bool = True,
) -> tuple[MaskDenoiser, list[float]]:
    """Trains a denoiser to map noised first predictions to the truth.

    Args:
        conditions: float32 (N, C, S, S), what the refiner sees of each image.
        starts: int64 (N, S, S), the first predictions that get noised.
        truths: int64 (N, S, S), the ground truth (IGNORED where unlabeled).

    Returns:
        The network (eval mode, on the CPU) and the loss of every iteration.
    """
    device = pick_device(refine.device)
    torch.manual_seed(refine.seed)
    model = MaskDenoiser(conditions.shape[1], num_classes, refine.diffusion_steps, refine.width).to(device)
    diffusion = MaskDiffusion(num_classes, refine.diffusion_steps)
    optimizer = torch.optim.Adam(model.parameters(), lr=refine.learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, refine.iterations)
    generator = torch.Generator().manual_seed(refine.seed)
    losses = []
    with torch_threads(refine.threads):
        for _ in tqdm(range(refine.iterations), desc="refine: train", unit="step", disable=not show_progress):
            batch = torch.randint(0, len(starts), (refine.batch_size,), generator=generator)
            condition, start, truth = _crop_and_flip([conditions[batch], starts[batch], truths[batch]],
                                                     refine.crop, refine.flips, generator)
            t = torch.randint(1, refine.diffusion_steps + 1, (refine.batch_size,), generator=generator)
            noisy = diffusion.sample(start, t, generator)
            logits = model(condition.to(device), noisy.to(device), t.to(device))
            loss = F.cross_entropy(logits, truth.to(device), ignore_index=IGNORED)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
    return model.cpu().eval(), losses


def _sampled_features(store: FeatureStore, indices: list[int], rng: np.random.Generator) -> np.ndarray:
    """(N, D) features of up to PIXELS_FOR_PROJECTION random pixels of each image."""
    height, width = store.image_shape
    parts = []
    for index in indices:
        chosen = rng.choice(height * width, min(PIXELS_FOR_PROJECTION, height * width), replace=False)
        parts.append(store.pixel_features(index, chosen // width, chosen % width))  # row-major (y, x)
    return np.concatenate(parts)


def _training_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 labels with every pixel that is not a class (ignored, unlabeled) as IGNORED."""
    labels = labels.astype(np.int64)
    return np.where((labels >= 0) & (labels < num_classes), labels, IGNORED)
