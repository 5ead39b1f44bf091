"""`synthesize`: sample images from the diffusion model, label them with the ensemble, filter.

The result is a labeled image folder in the project's own format, which every command reads:

    OUT/sample_000000.png + sample_000000.npy   the kept samples and their labels (int16)
    OUT/classes.json                             the ensemble's classes
    OUT/manifest.json                            settings, and per sample its uncertainty and fate
    OUT/filtered/                                the samples the filter dropped (same files)
    OUT/pictures/samples.png                     kept samples and the most uncertain dropped ones
    OUT/.synthesis/                              progress: settings and one record per finished sample

1. Each batch of samples is drawn from the checkpoint's own schedule (`sampling`), then read at
   the ensemble's steps and taps by the same feature source `extract` uses (re-noised with the
   shared noise, as a real image), and labeled by the members' majority vote; its uncertainty is
   the mean of its top 10 % pixels' Jensen–Shannon disagreement. Memory follows the batch.
2. A sample's files are written under temporary names and renamed into place, its record last:
   a stopped run (killed, disk full) leaves no half-written sample and resumes at the first
   batch with a missing record; every sample has its own generator, so the dataset is the same.
3. When all `count` samples exist, the filter (`filtering.kept_samples`) moves the dropped ones
   into `filtered/` and the manifest is written; a rerun with another count or filter only
   samples what is missing and re-filters.

`unlabeled`: samples only (no ensemble, no labels, no filter), for a person to annotate, as the
official configs do; `train` then trains the labeling ensemble on them.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from pipeline.config import SynthesizeSettings
from pipeline.data.folders import model_input_to_uint8
from pipeline.evaluation.predict import predict_from_tables
from pipeline.heads.pixel_ensemble.ensemble import Ensemble, load_ensemble
from pipeline.metrics import top_decile_mean
from pipeline.pictures.figures import save_prediction_grid
from pipeline.prediction import load_checked_source
from pipeline.runtime.atomic import replaced_file
from pipeline.runtime.devices import torch_threads
from pipeline.runtime.hashing import file_sha256
from pipeline.sources.diffusion_unet import load_unet_source
from pipeline.sources.latent import is_latent_diffusion_folder, load_latent_source
from pipeline.sources.loading import native_image_size
from pipeline.synthetic.filtering import kept_samples
from pipeline.synthetic.sampling import sample_images, sample_seed, sample_space_of

logger = logging.getLogger(__name__)

PROGRESS_FOLDER = ".synthesis"
FILTERED_FOLDER = "filtered"
MANIFEST = "manifest.json"


@dataclasses.dataclass(frozen=True)
class SynthesisSummary:
    """What a synthesis run left in its folder."""

    out_dir: Path
    samples: int
    kept: int
    sampled_now: int


def sample_name(index: int) -> str:
    return f"sample_{index:06d}"


def synthesize_dataset(
    checkpoint: str | Path,
    ensemble_dir: str | Path | None,
    out_dir: str | Path,
    settings: SynthesizeSettings,
    image_size: int | list[int] | None = None,
    show_progress: bool = True,
    code_sha256: str | None = None,
    replace_mismatched: bool = False,
    prompt_embeds: str | Path | None = None,
) -> SynthesisSummary:
    """Samples `settings.count` images, labels and filters them into `out_dir` (see the module docstring).

    Args:
        checkpoint: the diffusion model to sample from (any checkpoint `extract` reads).
        ensemble_dir: the labeling ensemble, trained on this checkpoint's features; None writes
            unlabeled samples only.
        out_dir: the dataset folder (created, or completed when a run stopped).
        settings: count, sampler, steps, filter, batch size, seed, device.
        image_size: the samples' size without an ensemble (default: the model's own); with an
            ensemble, its features' size.
        code_sha256: recorded with the settings, so that a folder made by other code is not resumed.
        replace_mismatched: delete a synthesis folder made with other settings and start over
            (the DVC stage); otherwise it is refused.
        prompt_embeds: latent diffusion: the file the ensemble's features were extracted with
            (for a folder without a text encoder), as `predict` takes it.

    Raises:
        ValueError: a bad setting, or an ensemble that cannot label this checkpoint's samples.
        StoreMismatchError: the ensemble was trained on another checkpoint's features.
        FileExistsError: `out_dir` holds a dataset made with other settings, or other files.
        OSError: the disk filled up or failed (finished samples are kept; rerun to complete).
    """
    out_dir = Path(out_dir)
    # 1. The model, the ensemble and the size; refused before anything is written.
    ensemble, source = _load_models(checkpoint, ensemble_dir, settings.device, prompt_embeds)
    size = ensemble.features.image_size if ensemble is not None else image_size or native_image_size(source)
    space = sample_space_of(source, size)
    record = _settings_record(source, ensemble_dir, settings, size) | {"code_sha256": code_sha256}
    progress = _prepare_folder(out_dir, record, ensemble, replace_mismatched)
    # 2. The missing samples, a batch at a time.
    pending = [batch for batch in _batches(settings.count, settings.batch_size) if not all(
        (progress / f"{sample_name(index)}.json").is_file() for index in batch)]
    bar = tqdm(total=settings.count, initial=settings.count - sum(map(len, pending)), desc="synthesize",
               unit="sample", disable=not show_progress)
    with torch_threads(settings.threads), bar:
        for batch in pending:
            generators = [torch.Generator().manual_seed(sample_seed(settings.seed, index)) for index in batch]
            images = sample_images(space, settings.sampler, settings.sampling_steps, generators)  # (B, 3, H, W)
            labels, uncertainties = _label(ensemble, source, images) if ensemble is not None else (None, None)
            _write_batch(out_dir, progress, batch, images.cpu().numpy(), labels, uncertainties)
            bar.update(len(batch))
    # 3. The filter and the manifest.
    kept = _filter_and_place(out_dir, progress, settings, record, ensemble)
    return SynthesisSummary(out_dir, settings.count, int(kept.sum()), sum(map(len, pending)))


def _load_models(checkpoint, ensemble_dir, device: str, prompt_embeds):
    """The labeling ensemble (or None) and the feature source of the checkpoint (its taps, if labeled)."""
    if ensemble_dir is None:
        if is_latent_diffusion_folder(checkpoint):
            return None, load_latent_source(checkpoint, [], [0], 0, device, prompt_embeds=prompt_embeds)
        return None, load_unet_source(checkpoint, [], [0], 0, device)
    ensemble = load_ensemble(ensemble_dir)
    return ensemble, load_checked_source(ensemble, Path(ensemble_dir), Path(checkpoint), device, prompt_embeds)


def _batches(count: int, batch_size: int) -> Iterator[list[int]]:
    """Fixed batches [k·B, (k+1)·B): a resumed run forms the same batches as the first."""
    for start in range(0, count, batch_size):
        yield list(range(start, min(start + batch_size, count)))


def _label(ensemble: Ensemble, source, images: torch.Tensor) -> tuple[np.ndarray, list[float]]:
    """The ensemble's labels int16 (B, H, W) and each image's uncertainty, from the samples'
    features (the source's re-noising at the ensemble's steps and taps, as `extract`)."""
    features = ensemble.features
    maps = source.feature_maps(images)  # tap → (B, T, C, h, w)
    labels, uncertainties = [], []
    for position in range(len(images)):
        tables = [maps[tap][position, step].cpu() for step in range(len(features.steps)) for tap in features.taps]
        prediction = predict_from_tables(ensemble, tables, features.image_size)
        labels.append(prediction.labels.astype(np.int16))
        uncertainties.append(top_decile_mean(prediction.disagreement))
    return np.stack(labels), uncertainties


def _settings_record(source, ensemble_dir, settings: SynthesizeSettings, size) -> dict:
    """What the samples depend on: a folder made with other values is not resumed."""
    ensemble_sha256 = None
    if ensemble_dir is not None:
        ensemble_sha256 = file_sha256(Path(ensemble_dir) / "members.safetensors")
    return {
        "checkpoint_sha256": source.provenance()["checkpoint_sha256"],
        "ensemble_sha256": ensemble_sha256,
        "sampler": settings.sampler,
        "sampling_steps": settings.sampling_steps,
        "seed": settings.seed,
        "batch_size": settings.batch_size,
        "image_size": size,
    }


def _prepare_folder(out_dir: Path, record: dict, ensemble: Ensemble | None, replace_mismatched: bool) -> Path:
    """Creates the dataset folder, or checks that the one there was made with the same settings.

    Raises:
        FileExistsError: the folder holds other files, or a dataset made with other settings.
    """
    progress = out_dir / PROGRESS_FOLDER
    settings_path = progress / "settings.json"
    if settings_path.is_file():
        recorded = json.loads(settings_path.read_text())
        differences = [f"{key} {recorded.get(key)!r} → {value!r}" for key, value in record.items() if recorded.get(key) != value]
        if not differences:
            return progress
        if not replace_mismatched:
            raise FileExistsError(
                f"{out_dir} holds samples made with other settings ({'; '.join(differences)}): "
                "give another --out, or delete it to start over"
            )
        logger.info("replacing %s, made with other settings (%s)", out_dir, "; ".join(differences))
        shutil.rmtree(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty and holds no synthesis: give a new or empty folder")
    progress.mkdir(parents=True, exist_ok=True)
    if ensemble is not None:
        classes = {"names": ensemble.class_names, "ignore_label": ensemble.ignore_label}
        with replaced_file(out_dir / "classes.json") as staging:
            staging.write_text(json.dumps(classes, indent=1))
    with replaced_file(settings_path) as staging:
        staging.write_text(json.dumps(record, indent=1))
    return progress


def _write_batch(out_dir: Path, progress: Path, batch: list[int], images: np.ndarray, labels, uncertainties) -> None:
    """Writes a batch's samples (images float32 (B, 3, H, W)); a full disk becomes one message."""
    for position, index in enumerate(batch):
        try:
            _write_sample(out_dir, progress, index, images[position], None if labels is None else labels[position],
                          None if uncertainties is None else uncertainties[position])
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
            raise OSError(
                errno.ENOSPC, f"the disk is full writing sample {sample_name(index)} into {out_dir}: the finished "
                "samples are kept; free space and run the same command again to complete it"
            ) from None


def _write_sample(out_dir: Path, progress: Path, index: int, image: np.ndarray, labels, uncertainty) -> None:
    """Writes one sample: its label map, then its image, then its record (the done mark), each
    renamed into place whole: a stop in between leaves a sample without its record, which the
    next run makes again, and never an image without its labels."""
    name = sample_name(index)
    for suffix in (".png", ".npy"):  # a copy an earlier filter moved aside is stale now
        (out_dir / FILTERED_FOLDER / f"{name}{suffix}").unlink(missing_ok=True)
    if labels is not None:
        with replaced_file(out_dir / f"{name}.npy") as staging, open(staging, "wb") as stream:
            np.save(stream, labels)
    with replaced_file(out_dir / f"{name}.png") as staging:
        Image.fromarray(model_input_to_uint8(image)).save(staging, format="PNG")
    with replaced_file(progress / f"{name}.json") as staging:
        staging.write_text(json.dumps({"uncertainty": uncertainty}))


def _filter_and_place(out_dir: Path, progress: Path, settings: SynthesizeSettings, record: dict,
                      ensemble: Ensemble | None) -> np.ndarray:
    """Filters the first `count` samples, moves each where it belongs, writes the manifest and
    the overview picture. Returns the kept mask (N,)."""
    names = [sample_name(index) for index in range(settings.count)]
    uncertainties = np.array([json.loads((progress / f"{name}.json").read_text())["uncertainty"] or 0.0 for name in names])
    if ensemble is None:
        kept = np.ones(len(names), dtype=bool)
    else:
        kept = kept_samples(uncertainties, settings.filter_fraction, settings.filter_lowest_fraction)
    for name, keep in zip(names, kept):
        _place(out_dir, name, keep)
    for marker in progress.glob("sample_*.json"):  # made by an earlier run with a larger count
        if int(marker.stem.removeprefix("sample_")) >= settings.count:
            _place(out_dir, marker.stem, keep=False)
    manifest = {
        "settings": {**record, "count": settings.count, "filter_fraction": settings.filter_fraction,
                     "filter_lowest_fraction": settings.filter_lowest_fraction, "labeled": ensemble is not None},
        "kept": int(kept.sum()),
        "samples": [
            {"name": name, "uncertainty": round(float(value), 6) if ensemble is not None else None,
             "kept": bool(keep)} for name, value, keep in zip(names, uncertainties, kept)
        ],
    }
    with replaced_file(out_dir / MANIFEST) as staging:
        staging.write_text(json.dumps(manifest, indent=1))
    if ensemble is not None and settings.pictures:
        _draw_overview(out_dir, names, uncertainties, kept, ensemble, settings.pictures)
    return kept


def _place(out_dir: Path, name: str, keep: bool) -> None:
    """Moves a sample's files into OUT (kept) or OUT/filtered (dropped), wherever they are now."""
    here, there = (out_dir, out_dir / FILTERED_FOLDER) if keep else (out_dir / FILTERED_FOLDER, out_dir)
    for suffix in (".npy", ".png"):  # the label map first: an image is never without its labels
        if (there / f"{name}{suffix}").is_file():
            here.mkdir(exist_ok=True)
            os.replace(there / f"{name}{suffix}", here / f"{name}{suffix}")


def _draw_overview(out_dir: Path, names, uncertainties: np.ndarray, kept: np.ndarray, ensemble: Ensemble,
                   pictures: int) -> None:
    """pictures/samples.png: the first kept samples, then the most uncertain dropped ones."""
    chosen = [index for index in range(len(names)) if kept[index]][:pictures]
    dropped = sorted((index for index in range(len(names)) if not kept[index]), key=lambda index: -uncertainties[index])
    chosen += dropped[: max(1, pictures // 2)]
    rows = []
    for index in chosen:
        name, keep = names[index], kept[index]
        folder = out_dir if keep else out_dir / FILTERED_FOLDER
        with Image.open(folder / f"{name}.png") as image:
            rgb = np.asarray(image.convert("RGB"))
        rows.append({"image": rgb, "prediction": np.load(folder / f"{name}.npy").astype(np.int64),
                     "title": f"#{index} {'kept' if keep else 'dropped'}\nu = {uncertainties[index]:.2f}"})
    (out_dir / "pictures").mkdir(exist_ok=True)
    save_prediction_grid(out_dir / "pictures" / "samples.png", rows, ensemble.class_names, ignore_label=None)
