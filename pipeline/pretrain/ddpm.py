"""Pretrain a pixel-space DDPM on a folder of unlabeled images: the paper's first step.

The model is a diffusers `UNet2DModel` laid out as a guided-diffusion ("ADM") UNet (built with
`backbones.adm_unet_config`), so `backbones.decoder_block` numbers its decoder blocks as the
paper does. `training` holds the run (noising, EMA, warm-up, checkpoints), `sampling` the DDIM
samples; this module loads the images, drives the loop and writes the outputs. The EMA weights
are the model that is saved.

The images are loaded once into RAM as uint8 (N, 3, S, S) and scaled to [-1, 1] a batch at a
time. A killed run resumes from its last checkpoint and continues as the uninterrupted run would have.

Outputs in `out_dir`::

    state.pt      training state (tensors and plain containers only; torch.load(weights_only=True))
    model/        the EMA UNet as a diffusers folder (config.json + safetensors): load_backbone(model/)
    loss.csv      step, loss, smoothed_loss
    samples.png   a grid of DDIM samples from the EMA model
    pretrain.json the settings, the image set's checksum and a summary
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DModel
from tqdm.auto import tqdm

from pipeline.data.folders import list_images, load_image
from pipeline.pictures.masks import save_png
from pipeline.pretrain.sampling import image_grid, sample_images
from pipeline.pretrain.settings import PretrainSettings, PretrainSummary
from pipeline.pretrain.training import LOSS_SMOOTHING, TrainingRun, load_state, save_state
from pipeline.runtime.atomic import replaced_folder
from pipeline.runtime.devices import has_native_bfloat16, pick_device
from pipeline.runtime.pause_points import pause_point

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"
MODEL_DIR = "model"
LOSS_FILE = "loss.csv"
SAMPLES_FILE = "samples.png"
SUMMARY_FILE = "pretrain.json"
_SAMPLE_SEED = 1234  # samples.png always starts from the same noise, so grids compare across runs


def load_image_tensor(images_dir: Path, size: int) -> tuple[torch.Tensor, str]:
    """Every image of a folder (sorted by name), resized, as one uint8 tensor.

    Returns:
        uint8 (N, 3, size, size) and the sha256 of its bytes (identifies the training set).

    Raises:
        FileNotFoundError: `images_dir` does not exist.
        ValueError: it holds no image, or an image cannot be read.
    """
    records = list_images(images_dir)
    # load_image gives x / 127.5 - 1 in float32: rounding it back recovers the uint8 exactly.
    pixels = np.stack([np.rint((load_image(record, size) + 1.0) * 127.5).astype(np.uint8) for record in records])
    images = torch.from_numpy(pixels)  # (N, 3, size, size)
    return images, hashlib.sha256(images.numpy().tobytes()).hexdigest()


def pretrain_ddpm(
    images_dir: Path, out_dir: Path, settings: PretrainSettings, show_progress: bool = True
) -> PretrainSummary:
    """Train (or resume training) a DDPM on the images of a folder; write its outputs to `out_dir`.

    Args:
        images_dir: Folder of PNG/JPEG images (label maps beside them are ignored).
        out_dir: Run folder; if it holds a `state.pt`, training resumes from it.
        settings: Architecture and training settings.
        show_progress: Show a tqdm bar with the smoothed loss.

    Raises:
        FileNotFoundError: `images_dir` does not exist.
        ValueError: No images; or `out_dir` holds a run of other settings or other images, or one
            already past `settings.steps`.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    device = pick_device(settings.device)
    if settings.precision == "bfloat16" and not has_native_bfloat16(device):
        logger.warning("pretrain: %s has no native bfloat16 (a CPU needs AVX-512 BF16 or AMX): torch emulates "
                       "it, about 10× slower than --precision float32", device)
    # 1. Data and the run's components; a checkpoint, if any, overwrites their initial state.
    images, images_sha256 = load_image_tensor(Path(images_dir), settings.image_size)
    run = TrainingRun.create(settings, device, len(images), images_sha256)
    state_path = out_dir / STATE_FILE
    if state_path.is_file():
        run.restore(load_state(state_path), state_path)
        logger.info("resuming %s from step %d of %d", out_dir, run.step, settings.steps)
    out_dir.mkdir(parents=True, exist_ok=True)
    resumed_from = run.step
    parameters = sum(parameter.numel() for parameter in run.unet.parameters())
    logger.info("pretrain: %d images, %d parameters, %s, %d steps", len(images), parameters, device, settings.steps)
    # 2. Train, checkpointing every `checkpoint_every` steps.
    last_log = (time.perf_counter(), run.step)
    with tqdm(total=settings.steps, initial=run.step, desc="pretrain", unit="step", disable=not show_progress) as bar:
        while run.step < settings.steps:
            run.train_step(images)
            bar.update(1)
            bar.set_postfix(loss=f"{run.smoothed_loss:.4f}", refresh=False)
            if run.step < settings.steps and run.step % settings.checkpoint_every == 0:
                save_state(run.state_dict(), state_path)
                _write_model_and_losses(run, out_dir)
                pause_point("pretrain-checkpoint-saved", run.step)
                last_log = _log_progress(run, last_log)
            if run.step < settings.steps and settings.sample_every and run.step % settings.sample_every == 0:
                _write_samples(run.ema_unet(), settings, out_dir / SAMPLES_FILE)
    # 3. Final state and outputs (rewritten also for a run that was already complete).
    save_state(run.state_dict(), state_path)
    _write_model_and_losses(run, out_dir)
    _log_progress(run, last_log)
    _write_samples(run.ema_unet(), settings, out_dir / SAMPLES_FILE)
    summary = PretrainSummary(
        out_dir=out_dir, model_dir=out_dir / MODEL_DIR, steps_done=run.step, resumed_from=resumed_from,
        images=len(images), parameters=parameters, final_loss=run.smoothed_loss,
        seconds=time.perf_counter() - started, device=str(device),
    )
    _write_summary(out_dir / SUMMARY_FILE, settings, images_sha256, summary)
    return summary


def _write_model_and_losses(run: TrainingRun, out_dir: Path) -> None:
    """The EMA model as a diffusers folder (written beside, then swapped in) and loss.csv."""
    with replaced_folder(out_dir / MODEL_DIR) as staging:
        run.ema_unet().save_pretrained(staging, safe_serialization=True)
    smoothed = _smoothed(run.losses)
    with open(out_dir / LOSS_FILE, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["step", "loss", "smoothed_loss"])
        writer.writerows((step + 1, f"{loss:.6f}", f"{smooth:.6f}") for step, (loss, smooth) in
                         enumerate(zip(run.losses, smoothed)))


def _write_samples(ema: UNet2DModel, settings: PretrainSettings, path: Path) -> None:
    generator = torch.Generator().manual_seed(_SAMPLE_SEED)
    images = sample_images(ema, settings.sample_count, generator, settings.sample_inference_steps)
    save_png(path, image_grid(images))


def _write_summary(path: Path, settings: PretrainSettings, images_sha256: str, summary: PretrainSummary) -> None:
    record = {
        "settings": dataclasses.asdict(settings),
        "images_sha256": images_sha256,
        "summary": {key: str(value) if isinstance(value, Path) else value
                    for key, value in dataclasses.asdict(summary).items()},
    }
    path.write_text(json.dumps(record, indent=1) + "\n")


def _log_progress(run: TrainingRun, last_log: tuple[float, int]) -> tuple[float, int]:
    now = time.perf_counter()
    seconds_per_step = (now - last_log[0]) / max(1, run.step - last_log[1])
    logger.info(
        "step %d/%d: smoothed loss %.4f, %.2f s/step, checkpoint written",
        run.step, run.settings.steps, run.smoothed_loss, seconds_per_step,
    )
    return now, run.step


def _smoothed(losses: list[float]) -> list[float]:
    """Bias-corrected exponential moving average of the losses (as Adam corrects its moments)."""
    smoothed, average = [], 0.0
    for index, loss in enumerate(losses):
        average = LOSS_SMOOTHING * average + (1.0 - LOSS_SMOOTHING) * loss
        smoothed.append(average / (1.0 - LOSS_SMOOTHING ** (index + 1)))
    return smoothed
