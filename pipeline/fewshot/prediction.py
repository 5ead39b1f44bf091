"""Segmenting new images with a trained few-shot model (DiffewS) from supports given by hand.

1. The supports: each an image and a mask of the same size (a PNG or a `.npy`, foreground where
   it is not 0), resized to the model's size (images bilinear, masks nearest) and checked
   before anything is written: a mask of another size than its image, or one with no
   foreground at the model's size, is refused naming the file.
2. Their keys and values are recorded once (`FewShotUNet.support_bank`), so that each query costs
   one UNet forward (and, for a latent model, one VAE encoding and decoding).
3. Each image: the predicted mask map, its foreground probability (the mean of the clipped
   channels), the mask above `threshold` × its maximum, at the image's own size. Written per image:
   `<name>.npy` (uint8, 1 = the supports' class), `<name>_mask.png`, `<name>_overlay.png`; then
   `summary.json` (per image: size and foreground fraction) and `predictions.png` (the supports,
   then image | prediction | foreground probability for the first images).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from tqdm.auto import tqdm

from pipeline.data.folders import ImageRecord, list_images, load_image, resize_nearest
from pipeline.fewshot.masks import decode_latents, encode_latents, foreground_probabilities, masks_to_maps
from pipeline.fewshot.training import IMAGE_CHANNELS, FewShotModel, load_fewshot_model
from pipeline.pictures.masks import class_palette, colour_mask, overlay, save_png
from pipeline.runtime.devices import pick_device, torch_threads

SUMMARY_FILE = "summary.json"
PICTURE_FILE = "predictions.png"


@dataclasses.dataclass(frozen=True)
class FewShotPredictionSummary:
    """What `predict_fewshot_folder` wrote: where, how many images, seconds in all and per query
    (the support bank excluded: it is recorded once)."""

    out_dir: Path
    images: int
    seconds: float
    seconds_per_query: float


def load_support(image_path: str | Path, mask_path: str | Path, size: int | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A support image float32 (3, H, W) in [-1, 1] and its mask float32 (H, W) in {0, 1}, at `size`.

    Raises:
        FileNotFoundError: a missing file.
        ValueError: an unreadable mask, a mask of another size than its image, or a mask with
            no foreground (at its own size or at the model's).
    """
    image_path, mask_path = Path(image_path), Path(mask_path)
    for path in (image_path, mask_path):
        if not path.is_file():
            raise FileNotFoundError(f"support file not found: {path}")
    record = ImageRecord(image_path.stem, image_path, None)
    image = torch.from_numpy(load_image(record, size))
    mask = _read_mask(mask_path)
    with Image.open(image_path) as opened:
        width, height = opened.size
    if mask.shape != (height, width):
        raise ValueError(f"support mask {mask_path} is {mask.shape[1]}×{mask.shape[0]}, its image {image_path} "
                         f"{width}×{height}: a mask must have its image's size")
    if not mask.any():
        raise ValueError(f"support mask {mask_path} has no foreground pixel: mark the class to segment (not 0)")
    model_size = (size, size) if isinstance(size, int) else tuple(size)
    resized = resize_nearest(mask.astype(np.uint8), model_size)  # (H, W) at the model's size
    if not resized.any():
        raise ValueError(f"support mask {mask_path} keeps no foreground pixel at the model's size "
                         f"{model_size[1]}×{model_size[0]}: its region is too small")
    return image, torch.from_numpy(resized.astype(np.float32))


def predict_fewshot_folder(
    model_dir: str | Path,
    supports: Sequence[tuple[str | Path, str | Path]],
    images_dir: str | Path,
    out_dir: str | Path,
    threshold: float = 0.25,
    device: str = "auto",
    threads: int = 0,
    show_progress: bool = True,
    pictures: int = 6,
) -> FewShotPredictionSummary:
    """Segments every image of a folder as the supports' class (see the module docstring).

    Args:
        model_dir: `fewshot-train`'s output folder.
        supports: (image, mask) paths, one or more.
        images_dir: the images to segment (PNG/JPEG, any size; label maps are ignored).
        out_dir: where the outputs go.
        threshold: foreground above this fraction of an image's maximum (the official 0.25).
        pictures: images shown in predictions.png.

    Raises:
        ValueError: no support, or what `load_support` and `load_fewshot_model` raise; both
            are checked before anything is written.
    """
    started = time.perf_counter()
    if not supports:
        raise ValueError("give at least one support image with its mask")
    loaded = load_fewshot_model(model_dir)
    size = loaded.record["image_size"]
    support_inputs = [load_support(image, mask, size) for image, mask in supports]
    records = list_images(images_dir)
    torch_device = pick_device(device)
    loaded.model.to(torch_device)
    if loaded.vae is not None:
        loaded.vae.to(torch_device)
    text = loaded.prompt_embeds.to(torch_device) if loaded.prompt_embeds is not None else None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    palette = class_palette(2)
    summaries, rows = [], []
    with torch_threads(threads), torch.inference_mode():
        bank = _support_bank(loaded, support_inputs, text, torch_device)
        queries_started = time.perf_counter()
        for record in tqdm(records, desc="fewshot-predict", unit="image", disable=not show_progress):
            query = torch.from_numpy(load_image(record, size))[None].to(torch_device)  # (1, 3, H, W)
            if loaded.vae is not None:
                query = encode_latents(loaded.vae, query)
            maps = loaded.model.segment(query, bank, text)
            if loaded.vae is not None:
                maps = decode_latents(loaded.vae, maps)
            probability = foreground_probabilities(maps)[0].cpu().numpy()  # (H, W) at the model's size
            summary, row = _write_outputs(record, probability, threshold, palette, out_dir)
            summaries.append(summary)
            if len(rows) < pictures:
                rows.append(row)
        seconds_per_query = (time.perf_counter() - queries_started) / len(records)
    if rows:
        save_fewshot_predictions(out_dir / PICTURE_FILE, support_inputs, rows)
    (out_dir / SUMMARY_FILE).write_text(json.dumps({
        "model": str(model_dir), "supports": [{"image": str(image), "mask": str(mask)} for image, mask in supports],
        "threshold": threshold, "seconds_per_query": seconds_per_query, "images": summaries}, indent=1))
    return FewShotPredictionSummary(out_dir, len(records), time.perf_counter() - started, seconds_per_query)


def _read_mask(path: Path) -> np.ndarray:
    """bool (H, W): a `.npy` array or an image file, foreground where not 0 (any channel)."""
    try:
        if path.suffix.lower() == ".npy":
            values = np.load(path, allow_pickle=False)
        else:
            with Image.open(path) as image:
                values = np.asarray(image)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read support mask {path}: {error}") from None
    if values.ndim == 3:
        values = values.any(axis=2)  # (H, W, C) → (H, W): foreground where any channel is set
    if values.ndim != 2:
        raise ValueError(f"support mask {path} must be a 2-D map (H, W), got shape {values.shape}")
    return values != 0


def _support_bank(loaded: FewShotModel, supports: list[tuple[torch.Tensor, torch.Tensor]], text, device):
    """The supports' keys and values, recorded once for every query."""
    images = torch.stack([image for image, _ in supports]).to(device)  # (N, 3, H, W)
    maps = masks_to_maps(torch.stack([mask for _, mask in supports]), IMAGE_CHANNELS).to(device)  # (N, 3, H, W)
    if loaded.vae is not None:
        images, maps = encode_latents(loaded.vae, images), encode_latents(loaded.vae, maps)
    return loaded.model.support_bank(images[None], maps[None], text)  # one support set: (1, N, C, h, w)


def _write_outputs(record: ImageRecord, probability: np.ndarray, threshold: float, palette: np.ndarray,
                   out_dir: Path) -> tuple[dict, dict]:
    """One image's outputs at its own size; returns its summary and its row of the figure."""
    with Image.open(record.image_path) as image:
        original = np.asarray(image.convert("RGB"))  # (H, W, 3)
    height, width = original.shape[:2]
    probability = np.asarray(Image.fromarray(probability.astype(np.float32)).resize((width, height),
                                                                                   Image.Resampling.BILINEAR))
    mask = (probability > threshold * probability.max()).astype(np.uint8)  # (H, W), the relative threshold
    np.save(out_dir / f"{record.name}.npy", mask)
    save_png(out_dir / f"{record.name}_mask.png", colour_mask(mask, palette, ignore_label=None))
    save_png(out_dir / f"{record.name}_overlay.png", overlay(original, mask, palette, ignore_label=None))
    summary = {"name": record.name, "width": width, "height": height,
               "foreground_fraction": round(float(mask.mean()), 6)}
    return summary, {"image": original, "mask": mask, "probability": probability, "title": record.name}


def save_fewshot_predictions(path: Path, supports: list[tuple[torch.Tensor, torch.Tensor]], rows: list[dict]) -> None:
    """First row: the supports with their masks tinted; then one row per image: image |
    predicted mask over it | foreground probability."""
    columns = max(3, len(supports))
    figure = Figure(figsize=(2.0 * columns, 2.0 * (len(rows) + 1) + 0.4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(rows) + 1, columns, squeeze=False)
    for cell in axes.flat:
        cell.set_xticks([])
        cell.set_yticks([])
        cell.set_frame_on(False)
    palette = class_palette(2)
    for column, (image, mask) in enumerate(supports):
        picture = ((image.permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)  # (H, W, 3)
        axes[0, column].imshow(overlay(picture, mask.numpy().astype(np.uint8), palette, ignore_label=None))
        axes[0, column].set_title(f"support {column + 1}", fontsize=9)
    for number, row in enumerate(rows, start=1):
        axes[number, 0].imshow(row["image"])
        axes[number, 1].imshow(overlay(row["image"], row["mask"], palette, ignore_label=None))
        axes[number, 2].imshow(row["probability"], cmap="magma", vmin=0.0, vmax=1.0)
        axes[number, 0].set_ylabel(row["title"], fontsize=8)
        if number == 1:
            for column, title in enumerate(("image", "prediction", "foreground probability")):
                axes[number, column].set_title(title, fontsize=9)
    figure.savefig(path, dpi=100)
