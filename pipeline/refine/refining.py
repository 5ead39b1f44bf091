"""Refining stored predictions with a trained refiner ("free re-noising").

Start from the ensemble's labels; at each step t of the schedule (descending), re-noise the
current map with q(x_t | x̂_0), let the refiner predict x_0, and take its argmax as the new
map. The last step's class probabilities and labels are the refined prediction; its
uncertainty is the entropy of those probabilities (nats).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from pipeline.config import EvaluateSettings, RefineSettings
from pipeline.evaluation.evaluate import PREDICTIONS_FOLDER
from pipeline.evaluation.predict import open_store_for_features
from pipeline.evaluation.predictions import Predictions, create_predictions
from pipeline.evaluation.report import write_masks_and_pictures, write_per_class_chart
from pipeline.evaluation.scoring import score_predictions
from pipeline.refine.conditioning import FeatureProjection, conditioning
from pipeline.refine.denoiser import MaskDenoiser
from pipeline.refine.mask_diffusion import MaskDiffusion
from pipeline.refine.training import REFINER_CONFIG, REFINER_WEIGHTS
from pipeline.runtime.atomic import replaced_folder
from pipeline.runtime.devices import torch_threads
from pipeline.store.schema import FeatureDescription


@dataclasses.dataclass
class Refiner:
    model: MaskDenoiser
    diffusion: MaskDiffusion
    projection: FeatureProjection
    class_names: list[str]
    ignore_label: int
    features: FeatureDescription  # the ensemble's, which the refiner's projection reads


def load_refiner(refiner_dir: str | Path) -> Refiner:
    """Reads a refiner written by `train_refiner` (FileNotFoundError / ValueError naming the folder)."""
    refiner_dir = Path(refiner_dir)
    if not (refiner_dir / REFINER_CONFIG).is_file() or not (refiner_dir / REFINER_WEIGHTS).is_file():
        raise FileNotFoundError(f"no refiner in {refiner_dir} (run `refine-train` first)")
    try:
        config = json.loads((refiner_dir / REFINER_CONFIG).read_text())
        tensors = load_file(refiner_dir / REFINER_WEIGHTS)
        num_classes = len(config["class_names"])
        model = MaskDenoiser(config["condition_channels"], num_classes, config["diffusion_steps"], config["width"])
        model.load_state_dict({name.removeprefix("model."): tensor for name, tensor in tensors.items()
                               if name.startswith("model.")})
        projection = FeatureProjection(tensors["projection.weight"].numpy(), tensors["projection.bias"].numpy())
        features = FeatureDescription(**config["features"])
    except (ValueError, KeyError, TypeError, RuntimeError) as error:
        raise ValueError(f"{refiner_dir} holds no readable refiner: {error}") from None
    return Refiner(model.eval(), MaskDiffusion(num_classes, config["diffusion_steps"]), projection,
                   config["class_names"], config["ignore_label"], features)


@torch.inference_mode()
def refine_image(
    refiner: Refiner, condition: torch.Tensor, start: np.ndarray, schedule: Sequence[int], generator: torch.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities float32 (K, S, S), labels int64 (S, S)) refined from labels `start` (S, S)."""
    current = torch.from_numpy(start.astype(np.int64))[None]  # (1, S, S)
    for step in schedule:
        t = torch.tensor([step])
        noisy = refiner.diffusion.sample(current, t, generator)
        logits = refiner.model(condition[None], noisy, t)  # (1, K, S, S)
        current = logits.argmax(dim=1)
    return logits.softmax(dim=1)[0].numpy(), current[0].numpy()


def refine_predictions(
    refiner_dir: str | Path,
    predictions_dir: str | Path,
    store_path: str | Path,
    out_dir: str | Path,
    schedule: Sequence[int],
    seed: int = 0,
    threads: int = 0,
    show_progress: bool = True,
) -> Predictions:
    """Refines every image of a predictions folder into a new one at `out_dir` (same format).

    Raises:
        ValueError: the predictions are of other classes than the refiner's, or name an image
            the store lacks; a schedule step outside 1..T.
        StoreMismatchError: the store lacks the features the refiner's ensemble was trained on.
    """
    refiner = load_refiner(refiner_dir)
    predictions = Predictions(predictions_dir)
    if predictions.class_names != refiner.class_names:
        raise ValueError(f"the predictions in {predictions_dir} are of classes {predictions.class_names}, the "
                         f"refiner in {refiner_dir} of {refiner.class_names}")
    if any(not 1 <= step <= refiner.diffusion.steps for step in schedule):
        raise ValueError(f"schedule {list(schedule)} has steps outside 1..{refiner.diffusion.steps} of {refiner_dir}")
    store = open_store_for_features(refiner.features, store_path, Path(refiner_dir), "refiner")
    position_in_store = {name: index for index, name in enumerate(store.image_names)}
    missing = [name for name in predictions.image_names if name not in position_in_store]
    if missing:
        raise ValueError(f"{store_path} lacks images of the predictions in {predictions_dir}: {missing[:5]}")
    generator = torch.Generator().manual_seed(seed)
    provenance = {"refiner": str(refiner_dir), "predictions": str(predictions_dir), "store": str(store_path),
                  "schedule": list(schedule), "seed": seed, "labels": "argmax of the refiner's last step"}
    with replaced_folder(Path(out_dir)) as staging, torch_threads(threads):
        writer = create_predictions(staging, predictions.image_names, predictions.class_names, predictions.ignore_label,
                                    predictions.image_size, has_uncertainty=True, provenance=provenance)
        for position, name in enumerate(tqdm(predictions.image_names, desc="refine", unit="image",
                                             disable=not show_progress)):
            index = position_in_store[name]
            condition = conditioning(predictions.probabilities(position), refiner.projection.project_image(store, index))
            probabilities, labels = refine_image(refiner, condition, predictions.labels(position), schedule, generator)
            entropy = -(probabilities * np.log(np.clip(probabilities, 1e-12, None))).sum(axis=0)  # (S, S)
            writer.write(position, probabilities, labels, entropy)
    return Predictions(out_dir)


def refine_on_store(
    refiner_dir: str | Path,
    predictions_dir: str | Path,
    store_path: str | Path,
    out_dir: str | Path,
    settings: RefineSettings,
    evaluate: EvaluateSettings,
    show_progress: bool = True,
) -> dict:
    """Refines stored predictions, then scores and draws them as `evaluate_on_store` does: writes
    `out_dir/predictions.zarr`, `metrics.json`, masks, `predictions.png` (with the refined
    column beside the prediction it refined) and `per_class_iou.png`. Returns the metrics."""
    out_dir = Path(out_dir)
    refined = refine_predictions(refiner_dir, predictions_dir, store_path, out_dir / PREDICTIONS_FOLDER,
                                 settings.schedule, settings.seed, settings.threads, show_progress)
    metrics = score_predictions(refined, store_path, evaluate.iou, out_dir / "metrics.json", show_progress)
    write_masks_and_pictures(refined, store_path, out_dir, evaluate.pictures, show_progress,
                             refined_from=Predictions(predictions_dir))
    write_per_class_chart(metrics, out_dir)
    return metrics
