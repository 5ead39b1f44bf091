"""Segmenting new images with a trained ensemble: no labels, no store, one image at a time."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from pipeline.data.coco import DEFAULT_IGNORE_LABEL, CocoBuilder, write_coco
from pipeline.data.folders import ClassInfo, list_images, load_image, resize_nearest
from pipeline.evaluation.predict import ImagePrediction, predict_from_tables
from pipeline.heads.pixel_ensemble.ensemble import Ensemble, load_ensemble
from pipeline.heads.segmenter.segmenter import Segmenter, is_segmenter_folder, load_segmenter
from pipeline.pictures.figures import save_prediction_grid
from pipeline.pictures.masks import class_palette, colour_mask, overlay, save_index_png, save_png, uncertainty_image
from pipeline.runtime.devices import pick_device, torch_threads
from pipeline.sources.loading import load_source_for
from pipeline.store.schema import StoreMismatchError

logger = logging.getLogger(__name__)
COCO_FILE = "annotations.json"


@dataclasses.dataclass(frozen=True)
class PredictionSummary:
    """What a prediction run wrote."""

    out_dir: Path
    images: int
    seconds: float


def check_checkpoint_matches(ensemble: Ensemble, checkpoint_sha256: str, checkpoint: Path, ensemble_dir: Path) -> None:
    """Refuses a checkpoint other than the one whose features trained the ensemble."""
    expected = ensemble.features.source.get("checkpoint_sha256")
    if expected != checkpoint_sha256:
        raise StoreMismatchError(
            f"the ensemble in {ensemble_dir} was trained on features of checkpoint sha256 {str(expected)[:12]}…, "
            f"but {checkpoint} has sha256 {checkpoint_sha256[:12]}…; use the checkpoint the ensemble was trained with"
        )


def _resize_values(values: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear resize of a float map (h, w) to (height, width)."""
    return np.asarray(Image.fromarray(values.astype(np.float32)).resize((width, height), Image.Resampling.BILINEAR))


def predict_folder(
    ensemble_dir: str | Path,
    checkpoint: str | Path | None,
    images_dir: str | Path,
    out_dir: str | Path,
    device: str = "auto",
    threads: int = 0,
    show_progress: bool = True,
    pictures: int = 6,
    prompt_embeds: str | Path | None = None,
    formats: Sequence[str] = (),
) -> PredictionSummary:
    """Segments every image of a folder and writes, per image: `<name>.npy` (labels at the
    image's own size), `<name>_mask.png`, `<name>_overlay.png`, `<name>_uncertainty.png`; and
    `summary.json` (per image: size, uncertainty score, class fractions), and `predictions.png`
    (image | prediction | uncertainty, with a class legend) for the first ``pictures`` images.
    `formats`, for labeling tools to import as pre-annotations: "png", an index PNG per image
    (`<name>_labels.png`, pixel value = class index; 16-bit past 256 classes); "coco",
    `annotations.json` with every image's masks as RLEs (`pipeline.data.coco`, which `extract
    --coco` reads back once a person has corrected them).

    Images are processed one at a time, so memory does not grow with the folder (only the
    first ``pictures`` images are kept for the overview figure).

    `ensemble_dir` may hold a segmenter (`train-segmenter`) instead: it needs no checkpoint, and
    its uncertainty map is the entropy of its softmax.
    """
    started = time.perf_counter()
    ensemble_dir, out_dir = Path(ensemble_dir), Path(out_dir)
    # 1. The model: an ensemble with the diffusion model that makes its features, or a segmenter alone.
    if is_segmenter_folder(ensemble_dir):
        model = load_segmenter(ensemble_dir, pick_device(device))
        predict_image = segmenter_predictor(model)
    else:
        if checkpoint is None:
            raise ValueError(f"{ensemble_dir} holds an ensemble: give the --checkpoint its features came from")
        model = load_ensemble(ensemble_dir)
        predict_image = ensemble_predictor(model, load_checked_source(model, ensemble_dir, Path(checkpoint), device, prompt_embeds))
    palette = class_palette(model.num_classes)
    records = list_images(images_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # 2. Each image: prediction → outputs at the image's own size.
    summaries, picture_rows = [], []
    coco = CocoBuilder(ClassInfo(model.class_names, DEFAULT_IGNORE_LABEL)) if "coco" in formats else None
    with torch_threads(threads):
        for record in tqdm(records, desc="predict", unit="image", disable=not show_progress):
            prediction = predict_image(record)
            summary, picture_row = _write_outputs(record, prediction, model.class_names, palette, out_dir)
            if "png" in formats:
                save_index_png(out_dir / f"{record.name}_labels.png", picture_row["prediction"])
            if coco is not None:
                coco.add(record.image_path.name, picture_row["prediction"])
            summaries.append(summary)
            if len(picture_rows) < pictures:
                picture_rows.append(picture_row)
    if coco is not None:
        write_coco(out_dir / COCO_FILE, coco.coco)
    if picture_rows:
        save_prediction_grid(out_dir / "predictions.png", picture_rows, model.class_names, ignore_label=None)
    (out_dir / "summary.json").write_text(
        json.dumps({"model": str(ensemble_dir), "checkpoint": None if checkpoint is None else str(checkpoint),
                    "images": summaries}, indent=1)
    )
    return PredictionSummary(out_dir, len(records), time.perf_counter() - started)


def load_checked_source(ensemble: Ensemble, ensemble_dir: Path, checkpoint: Path, device: str, prompt_embeds=None):
    """The feature source that makes the ensemble's features, refused unless it is the checkpoint
    the ensemble was trained on."""
    features = ensemble.features
    if "noise_seed" not in features.source:
        raise ValueError(f"the ensemble in {ensemble_dir} was trained on {features.source.get('kind')} features, "
                         "not a diffusion model's; `predict` segments with diffusion features only")
    source = load_source_for(checkpoint, features.source, features.steps, features.taps, device, prompt_embeds)
    check_checkpoint_matches(ensemble, source.provenance()["checkpoint_sha256"], checkpoint, ensemble_dir)
    return source


def ensemble_predictor(ensemble: Ensemble, source):
    """record → ImagePrediction: the source's features at the ensemble's steps and taps, then its votes."""
    features = ensemble.features
    size = features.image_size

    def predict_image(record) -> ImagePrediction:
        model_input = torch.from_numpy(load_image(record, size))[None].to(source.device)  # (1, 3, H, W)
        maps = source.feature_maps(model_input)  # tap → (1, T, C, h, w)
        tables = [maps[tap][0, step].cpu() for step in range(len(features.steps)) for tap in features.taps]  # feature order
        return predict_from_tables(ensemble, tables, size)

    return predict_image


def segmenter_predictor(segmenter: Segmenter):
    """record → ImagePrediction from a segmenter: its argmax, and the entropy of its softmax as
    the uncertainty map (one model: no members to disagree)."""

    def predict_image(record) -> ImagePrediction:
        model_input = torch.from_numpy(load_image(record, segmenter.image_size))[None]  # (1, 3, H, W)
        device = next(segmenter.network.parameters()).device
        probabilities = segmenter.probabilities(model_input.to(device))[0].cpu()  # (K, H, W)
        entropy = -(probabilities * probabilities.clamp_min(1e-30).log()).sum(dim=0)  # (H, W)
        return ImagePrediction(probabilities.argmax(dim=0).numpy(), entropy.numpy(), probabilities.numpy())

    return predict_image


def _write_outputs(
    record, prediction: ImagePrediction, class_names: list[str], palette: np.ndarray, out_dir: Path
) -> tuple[dict, dict]:
    """Writes one image's outputs; returns its summary and its row of the overview figure."""
    with Image.open(record.image_path) as image:
        original = np.asarray(image.convert("RGB"))  # (H, W, 3)
    height, width = original.shape[:2]
    labels = resize_nearest(prediction.labels, (height, width))
    disagreement = np.clip(_resize_values(prediction.disagreement, width, height), 0, None)
    np.save(out_dir / f"{record.name}.npy", labels.astype(np.int16))
    save_png(out_dir / f"{record.name}_mask.png", colour_mask(labels, palette, ignore_label=None))
    save_png(out_dir / f"{record.name}_overlay.png", overlay(original, labels, palette, ignore_label=None))
    save_png(out_dir / f"{record.name}_uncertainty.png", uncertainty_image(disagreement))
    counts = np.bincount(labels.ravel(), minlength=len(class_names))
    summary = {
        "name": record.name,
        "width": width,
        "height": height,
        "uncertainty": round(prediction.uncertainty, 6),
        "class_fractions": {
            name: round(count / labels.size, 6) for name, count in zip(class_names, counts) if count
        },
    }
    picture_row = {"image": original, "prediction": labels, "uncertainty": disagreement, "title": record.name}
    return summary, picture_row
