"""Pretrain a pixel-space DDPM on a folder of unlabeled images: the paper's first step.

The model is a diffusers `UNet2DModel` laid out as a guided-diffusion ("ADM") UNet (built with
`backbones.adm_unet_config`), so `backbones.decoder_block` numbers its decoder blocks as the
paper does. Training follows Ho et al. 2020: the linear β schedule 1e-4 → 0.02 over 1000 steps,
uniform t, ε-prediction with an MSE loss, AdamW, and an exponential moving average (EMA) of the
weights; the EMA weights are the model that is saved.

The images are loaded once into RAM as uint8 (N, 3, S, S) and scaled to [-1, 1] a batch at a
time. Every random draw (batch indices, t, ε, flips) comes from one CPU `torch.Generator` whose
state is checkpointed with the model, the EMA and the optimiser, so a killed run resumes where
its last checkpoint left it and continues as the uninterrupted run would have.

Outputs in `out_dir`::

    state.pt      training state (tensors and plain containers only; torch.load(weights_only=True))
    model/        the EMA UNet as a diffusers folder (config.json + safetensors): load_backbone(model/)
    loss.csv      step, loss, smoothed_loss
    samples.png   a grid of DDIM samples from the EMA model
    pretrain.json the settings, the image set's checksum and a summary
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from tqdm.auto import tqdm

from pipeline.data.folders import list_images, load_image
from pipeline.pictures.masks import save_png
from pipeline.runtime.atomic import replaced_file, replaced_folder
from pipeline.runtime.devices import has_native_bfloat16, pick_device
from pipeline.runtime.pause_points import pause_point
from pipeline.sources.adm.convert import AdmLayout, adm_unet_config
from pipeline.sources.noise import NUM_TRAIN_STEPS, paper_scheduler

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"
MODEL_DIR = "model"
LOSS_FILE = "loss.csv"
SAMPLES_FILE = "samples.png"
SUMMARY_FILE = "pretrain.json"
STATE_FORMAT = 1
# Settings that do not change what is trained: a resumed run may change them (steps to extend it).
_RESUMABLE_FIELDS = frozenset(
    {"steps", "checkpoint_every", "sample_every", "sample_count", "sample_inference_steps", "device", "precision"}
)
_GROUP_NORM_GROUPS = 32  # guided-diffusion's GroupNorm(32, C): every width must be a multiple
_LOSS_SMOOTHING = 0.98  # EMA factor of the smoothed loss shown in the progress bar and loss.csv
_AUTOCAST_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}  # precision → autocast dtype
_SAMPLE_SEED = 1234  # samples.png always starts from the same noise, so grids compare across runs


@dataclasses.dataclass(frozen=True)
class PretrainSettings:
    """How the DDPM is built and trained.

    Attributes:
        image_size: Images are resized to image_size × image_size (bicubic).
        block_out_channels: Channels of each resolution level, highest resolution first
            (guided-diffusion's model_channels × channel_mult); multiples of 32.
        layers_per_block: ResBlocks per encoder level; the decoder has one more per level, so 2
            gives guided-diffusion's numbering with 3 decoder blocks per level.
        attention_levels: Indices of the levels (0 = full resolution) whose blocks carry
            self-attention; the middle block always has it.
        head_channels: Channels per attention head.
        steps: Total optimiser steps (a resumed run continues up to this number).
        batch_size: Images per step, drawn uniformly with replacement.
        learning_rate: AdamW learning rate after the warm-up.
        warmup_steps: Linear learning-rate warm-up from 0.
        weight_decay: AdamW weight decay.
        gradient_clip: Largest gradient norm (0 disables clipping).
        ema_decay: Decay of the weight EMA (ramped up as min(decay, (1 + n) / (10 + n))).
        horizontal_flips: Flip half the images of each batch. Off by default: flips change the
            meaning of digits and text.
        seed: Seeds the initial weights and every random draw of training.
        checkpoint_every: Steps between checkpoints (state.pt, model/, loss.csv).
        sample_every: Steps between sample grids during training; 0 = only at the end.
        sample_count: Images in samples.png.
        sample_inference_steps: DDIM steps per sample.
        device: "auto" (cuda > mps > cpu) or a torch device string.
        precision: "float32", or "bfloat16" to run the forward pass under bfloat16 autocast
            (weights, optimiser and loss stay float32): about 1.5-2× faster on CPUs with AMX or
            AVX-512 BF16 and on recent GPUs, but ~10× slower on CPUs without them (a warning
            says so). A resumed run may switch it.
    """

    image_size: int = 32
    block_out_channels: list[int] = dataclasses.field(default_factory=lambda: [32, 32, 64, 64, 64])
    layers_per_block: int = 2
    attention_levels: list[int] = dataclasses.field(default_factory=lambda: [3, 4])
    head_channels: int = 32
    steps: int = 5000
    batch_size: int = 32
    learning_rate: float = 2e-4
    warmup_steps: int = 100
    weight_decay: float = 0.0
    gradient_clip: float = 1.0
    ema_decay: float = 0.999
    horizontal_flips: bool = False
    seed: int = 0
    checkpoint_every: int = 500
    sample_every: int = 0
    sample_count: int = 64
    sample_inference_steps: int = 50
    device: str = "auto"
    precision: str = "float32"

    def __post_init__(self) -> None:
        if self.precision not in _AUTOCAST_DTYPES:
            raise ValueError(f"pretrain: precision must be one of {sorted(_AUTOCAST_DTYPES)}, got {self.precision!r}")
        levels = len(self.block_out_channels)
        if levels == 0 or any(c <= 0 or c % _GROUP_NORM_GROUPS for c in self.block_out_channels):
            raise ValueError(f"pretrain: block_out_channels must be multiples of 32, got {self.block_out_channels}")
        if self.image_size <= 0 or self.image_size % 2 ** (levels - 1):
            raise ValueError(
                f"pretrain: image_size {self.image_size} must be divisible by 2^{levels - 1} for {levels} levels"
            )
        if any(not 0 <= level < levels for level in self.attention_levels):
            raise ValueError(f"pretrain: attention_levels {self.attention_levels} must lie in 0..{levels - 1}")
        positive = ("layers_per_block", "head_channels", "steps", "batch_size", "checkpoint_every",
                    "sample_count", "sample_inference_steps")
        bad = {name: getattr(self, name) for name in positive if getattr(self, name) <= 0}
        if bad:
            raise ValueError(f"pretrain: these settings must be positive: {bad}")
        if not 0.0 <= self.ema_decay < 1.0 or self.learning_rate <= 0.0:
            raise ValueError(f"pretrain: need 0 <= ema_decay < 1 and learning_rate > 0, got "
                             f"{self.ema_decay}, {self.learning_rate}")
        if min(self.warmup_steps, self.sample_every, self.weight_decay, self.gradient_clip) < 0:
            raise ValueError("pretrain: warmup_steps, sample_every, weight_decay, gradient_clip must be >= 0")


@dataclasses.dataclass(frozen=True)
class PretrainSummary:
    """What a `pretrain_ddpm` call did.

    Attributes:
        out_dir: The run folder.
        model_dir: The EMA model (diffusers folder).
        steps_done: Optimiser steps the model has had in all (== settings.steps).
        resumed_from: The checkpoint step this call started from (0 for a fresh run).
        images: Training images.
        parameters: Parameters of the UNet.
        final_loss: Smoothed training loss at the last step.
        seconds: Wall time of this call.
        device: Where it trained.
    """

    out_dir: Path
    model_dir: Path
    steps_done: int
    resumed_from: int
    images: int
    parameters: int
    final_loss: float
    seconds: float
    device: str


def build_unet(settings: PretrainSettings) -> UNet2DModel:
    """A randomly initialised `UNet2DModel` with guided-diffusion's layout, seeded by `settings.seed`.

    3 channels in and out (no learned variance), ResBlock up/downsampling, scale-shift norm.
    The global random state is left untouched.
    """
    layout = AdmLayout(
        in_channels=3,
        out_channels=3,
        level_channels=tuple(settings.block_out_channels),
        num_res_blocks=settings.layers_per_block,
        attention_levels=tuple(level in settings.attention_levels for level in range(len(settings.block_out_channels))),
        scale_shift_norm=True,
        resblock_updown=True,
    )
    config = adm_unet_config(layout, head_channels=settings.head_channels, source="pretrain settings")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        unet = UNet2DModel.from_config(config | {"sample_size": settings.image_size})
    return unet


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
    run = _TrainingRun.create(settings, device, len(images), images_sha256)
    state_path = out_dir / STATE_FILE
    if state_path.is_file():
        run.restore(_load_state(state_path), state_path)
        logger.info("resuming %s from step %d of %d", out_dir, run.step, settings.steps)
    out_dir.mkdir(parents=True, exist_ok=True)
    resumed_from = run.step
    parameters = sum(parameter.numel() for parameter in run.unet.parameters())
    logger.info("pretrain: %d images, %d parameters, %s, %d steps", len(images), parameters, device, settings.steps)
    # 2. Train, checkpointing every `checkpoint_every` steps.
    alphas_cumprod = paper_scheduler().alphas_cumprod  # (1000,)
    last_log = (time.perf_counter(), run.step)
    with tqdm(total=settings.steps, initial=run.step, desc="pretrain", unit="step", disable=not show_progress) as bar:
        while run.step < settings.steps:
            run.train_step(images, alphas_cumprod)
            bar.update(1)
            bar.set_postfix(loss=f"{run.smoothed_loss:.4f}", refresh=False)
            if run.step < settings.steps and run.step % settings.checkpoint_every == 0:
                _save_state(run.state_dict(), state_path)
                _write_model_and_losses(run, out_dir)
                pause_point("pretrain-checkpoint-saved", run.step)
                last_log = _log_progress(run, last_log)
            if run.step < settings.steps and settings.sample_every and run.step % settings.sample_every == 0:
                _write_samples(run.ema, settings, out_dir / SAMPLES_FILE)
    # 3. Final state and outputs (rewritten also for a run that was already complete).
    _save_state(run.state_dict(), state_path)
    _write_model_and_losses(run, out_dir)
    _log_progress(run, last_log)
    _write_samples(run.ema, settings, out_dir / SAMPLES_FILE)
    summary = PretrainSummary(
        out_dir=out_dir, model_dir=out_dir / MODEL_DIR, steps_done=run.step, resumed_from=resumed_from,
        images=len(images), parameters=parameters, final_loss=run.smoothed_loss,
        seconds=time.perf_counter() - started, device=str(device),
    )
    _write_summary(out_dir / SUMMARY_FILE, settings, images_sha256, summary)
    return summary


class _TrainingRun:
    """The mutable state of one training run: model, EMA, optimiser, random stream, losses."""

    def __init__(self, settings, device, unet, ema, optimizer, generator, identity):
        self.settings = settings
        self.device = device
        self.unet = unet
        self.ema = ema
        self.optimizer = optimizer
        self.generator = generator  # CPU: every draw of training, the same on any device
        self.identity = identity  # what a checkpoint must match to be resumed
        self.step = 0
        self.losses: list[float] = []
        self.loss_average = 0.0  # exponential moving average of the losses, not bias-corrected

    @classmethod
    def create(cls, settings: PretrainSettings, device: torch.device, image_count: int, images_sha256: str):
        unet = build_unet(settings).to(device).train()
        ema = copy.deepcopy(unet).eval().requires_grad_(False)
        optimizer = torch.optim.AdamW(
            unet.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay,
            fused=device.type in ("cpu", "cuda"),  # one kernel for all tensors: several times faster
        )
        generator = torch.Generator().manual_seed(settings.seed)
        training_settings = {
            key: value for key, value in dataclasses.asdict(settings).items() if key not in _RESUMABLE_FIELDS
        }
        identity = {"settings": training_settings, "images": {"count": image_count, "sha256": images_sha256}}
        return cls(settings, device, unet, ema, optimizer, generator, identity)

    def train_step(self, images: torch.Tensor, alphas_cumprod: torch.Tensor) -> None:
        """One optimiser step on a random batch, then the EMA update."""
        batch_size = self.settings.batch_size
        # 1. Draw the batch, t and ε on the CPU generator.
        indices = torch.randint(len(images), (batch_size,), generator=self.generator)
        clean = images[indices].to(torch.float32) / 127.5 - 1.0  # (B, 3, S, S) in [-1, 1]
        if self.settings.horizontal_flips:
            flip = torch.rand(batch_size, generator=self.generator) < 0.5
            clean[flip] = clean[flip].flip(-1)
        timesteps = torch.randint(NUM_TRAIN_STEPS, (batch_size,), generator=self.generator)
        noise = torch.randn(clean.shape, generator=self.generator)
        # 2. x_t = sqrt(ᾱ_t)·x_0 + sqrt(1-ᾱ_t)·ε, one t per image (q_sample takes one t for all).
        alpha_bar = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = (alpha_bar.sqrt() * clean + (1.0 - alpha_bar).sqrt() * noise).to(self.device)
        # 3. ε-prediction MSE, clipped gradients, warmed-up learning rate.
        autocast_dtype = _AUTOCAST_DTYPES[self.settings.precision]
        with torch.autocast(self.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            prediction = self.unet(noisy, timesteps.to(self.device)).sample
        loss = F.mse_loss(prediction.float(), noise.to(self.device))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.settings.gradient_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.settings.gradient_clip)
        warmup = min(1.0, (self.step + 1) / self.settings.warmup_steps) if self.settings.warmup_steps else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = self.settings.learning_rate * warmup
        self.optimizer.step()
        # 4. EMA of the weights, with the usual ramp so early averages are not dominated by the init.
        decay = min(self.settings.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for averaged, current in zip(self.ema.parameters(), self.unet.parameters()):
                averaged.lerp_(current, 1.0 - decay)
        self.step += 1
        self.losses.append(loss.item())
        self.loss_average = _LOSS_SMOOTHING * self.loss_average + (1.0 - _LOSS_SMOOTHING) * self.losses[-1]

    @property
    def smoothed_loss(self) -> float:
        """The bias-corrected average, as Adam corrects its moments; NaN before the first step."""
        return self.loss_average / (1.0 - _LOSS_SMOOTHING ** len(self.losses)) if self.losses else float("nan")

    def state_dict(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "step": self.step,
            **self.identity,
            "all_settings": dataclasses.asdict(self.settings),
            "model": self.unet.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "losses": torch.tensor(self.losses, dtype=torch.float64),
        }

    def restore(self, state: dict, source: Path) -> None:
        """Load a checkpoint after checking it belongs to this run.

        Raises:
            ValueError: Another format, other settings or images, or more steps than asked for.
        """
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"{source}: unknown training state format {state.get('format')!r}")
        _check_same_run(state, self.identity, source)
        if state["step"] > self.settings.steps:
            raise ValueError(
                f"{source}: the run is already at step {state['step']}, past steps={self.settings.steps}; "
                "ask for at least as many steps, or use another output folder"
            )
        self.unet.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.step = int(state["step"])
        self.losses = state["losses"].tolist()
        for loss in self.losses:
            self.loss_average = _LOSS_SMOOTHING * self.loss_average + (1.0 - _LOSS_SMOOTHING) * loss


def _check_same_run(state: dict, identity: dict, source: Path) -> None:
    """Refuse a checkpoint of other training settings or other images, naming the differences."""
    saved, wanted = state["settings"], identity["settings"]
    differing = sorted(key for key in set(saved) | set(wanted) if saved.get(key) != wanted.get(key))
    if differing:
        changes = ", ".join(f"{key}: {saved.get(key)!r} there, {wanted.get(key)!r} now" for key in differing)
        raise ValueError(
            f"{source} was trained with other settings ({changes}); use the same settings to resume it, "
            "or another output folder for a new run"
        )
    if state["images"] != identity["images"]:
        raise ValueError(
            f"{source} was trained on other images ({state['images']['count']} images, sha256 "
            f"{state['images']['sha256'][:12]}…) than these ({identity['images']['count']} images, sha256 "
            f"{identity['images']['sha256'][:12]}…); use another output folder for a new run"
        )


def _save_state(state: dict, path: Path) -> None:
    """torch.save to a staging file, then rename: a kill never leaves a half-written state."""
    with replaced_file(path) as staging:
        torch.save(state, staging)
        pause_point("pretrain-state-staged", state["step"])


def _load_state(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError, RuntimeError (truncated zip), EOFError, ...
        raise ValueError(f"{path}: not a readable training state ({error}); delete it to start afresh") from error


def _write_model_and_losses(run: _TrainingRun, out_dir: Path) -> None:
    """The EMA model as a diffusers folder (written beside, then swapped in) and loss.csv."""
    with replaced_folder(out_dir / MODEL_DIR) as staging:
        run.ema.save_pretrained(staging, safe_serialization=True)
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


def _log_progress(run: _TrainingRun, last_log: tuple[float, int]) -> tuple[float, int]:
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
        average = _LOSS_SMOOTHING * average + (1.0 - _LOSS_SMOOTHING) * loss
        smoothed.append(average / (1.0 - _LOSS_SMOOTHING ** (index + 1)))
    return smoothed


@torch.inference_mode()
def sample_images(
    unet: UNet2DModel, count: int, generator: torch.Generator, num_inference_steps: int = 50
) -> np.ndarray:
    """Sample images with deterministic DDIM (η = 0) over the linear schedule's 1000 steps.

    Args:
        unet: An ε-predicting UNet; its `sample_size` config gives the image size.
        count: Images to sample.
        generator: CPU generator of the initial noise (the same samples on every device).
        num_inference_steps: DDIM steps, evenly spaced from t = 999 down to t = 0.

    Returns:
        uint8 (count, S, S, 3).
    """
    size = unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    device = next(unet.parameters()).device
    alphas_cumprod = paper_scheduler().alphas_cumprod  # (1000,)
    timesteps = torch.linspace(NUM_TRAIN_STEPS - 1, 0, num_inference_steps).round().long().unique_consecutive()
    sample = torch.randn(count, unet.config.in_channels, size, size, generator=generator).to(device)
    was_training = unet.training
    unet.eval()
    for index, step in enumerate(timesteps.tolist()):
        alpha_bar = alphas_cumprod[step].item()
        alpha_bar_next = alphas_cumprod[timesteps[index + 1]].item() if index + 1 < len(timesteps) else 1.0
        noise = unet(sample, torch.full((count,), step, device=device)).sample
        # x̂_0 clipped to the data range; ε re-derived from it so the update stays consistent.
        clean = ((sample - math.sqrt(1.0 - alpha_bar) * noise) / math.sqrt(alpha_bar)).clamp(-1.0, 1.0)
        noise = (sample - math.sqrt(alpha_bar) * clean) / math.sqrt(1.0 - alpha_bar)
        sample = math.sqrt(alpha_bar_next) * clean + math.sqrt(1.0 - alpha_bar_next) * noise
    unet.train(was_training)
    pixels = ((sample.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)  # (N, 3, S, S)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: np.ndarray, padding: int = 2, min_cell: int = 96) -> np.ndarray:
    """Tile uint8 (N, H, W, 3) images into a near-square grid, enlarged (nearest) to >= min_cell px.

    Returns:
        uint8 (rows·(h+padding)+padding, columns·(w+padding)+padding, 3), white between cells.
    """
    count, height, width, _ = images.shape
    scale = max(1, -(-min_cell // max(height, width)))  # ceil
    cells = images.repeat(scale, axis=1).repeat(scale, axis=2)  # (N, h, w, 3)
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    cell_h, cell_w = height * scale + padding, width * scale + padding
    grid = np.full((rows * cell_h + padding, columns * cell_w + padding, 3), 255, dtype=np.uint8)
    for index, cell in enumerate(cells):
        top, left = padding + (index // columns) * cell_h, padding + (index % columns) * cell_w
        grid[top : top + height * scale, left : left + width * scale] = cell
    return grid
