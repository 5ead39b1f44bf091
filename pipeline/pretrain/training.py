"""One DDPM training run's mutable state: the UNet, its EMA, AdamW, the warm-up, the random stream.

Training follows Ho et al. 2020: the linear β schedule 1e-4 → 0.02 over 1000 steps, uniform t,
ε-prediction with an MSE loss, AdamW, and an exponential moving average (EMA) of the weights. The
pieces come from diffusers: `DDPMScheduler.add_noise` noises, `EMAModel` averages,
`get_constant_schedule_with_warmup` warms the learning rate up.

Every random draw (batch indices, t, ε, flips) comes from one CPU `torch.Generator` whose state is
checkpointed with the rest (`TrainingRun.state_dict`), so a killed run resumes where its last
checkpoint left it and continues as the uninterrupted run would have.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from diffusers.optimization import get_constant_schedule_with_warmup
from diffusers.training_utils import EMAModel

from pipeline.pretrain.settings import AUTOCAST_DTYPES, RESUMABLE_FIELDS, PretrainSettings
from pipeline.runtime.atomic import replaced_file
from pipeline.runtime.pause_points import pause_point
from pipeline.sources.adm.convert import AdmLayout, adm_unet_config
from pipeline.sources.noise import NUM_TRAIN_STEPS, paper_scheduler

logger = logging.getLogger(__name__)

# 2: + "ema_state" (EMAModel's counters) and "lr_schedule" (the LambdaLR's state). Format 1 (before
# diffusers' EMAModel and LR schedule) still resumes: both are functions of the step count.
STATE_FORMAT = 2
_READABLE_FORMATS = (1, 2)
LOSS_SMOOTHING = 0.98  # EMA factor of the smoothed loss shown in the progress bar and loss.csv


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


def weight_ema(unet: UNet2DModel, decay: float) -> EMAModel:
    """diffusers' EMA of `unet`'s weights with the ramp min(decay, (1 + n) / (10 + n)) at step n (from 0).

    EMAModel's warm-up decay is 1 - (1 + s / inv_gamma)^-power with s = updates - update_after_step - 1;
    inv_gamma = 9, power = 1 and update_after_step = -1 make that (1 + n) / (10 + n) at update n + 1,
    within 1 ulp (its default ramp instead skips the first update: decay 0, then (1 + s) / (10 + s)).
    """
    return EMAModel(unet.parameters(), decay=decay, min_decay=0.0, update_after_step=-1, use_ema_warmup=True,
                    inv_gamma=9.0, power=1.0, foreach=True)


def warmup_schedule(optimizer: torch.optim.Optimizer, settings: PretrainSettings, steps_done: int):
    """diffusers' linear warm-up (a LambdaLR) giving optimiser step n the rate lr · min(1, (n + 1) / warmup).

    Its factor at count c is c / warmup, so a count from 0 would give the first step a rate of 0; the
    count starts at steps_done + 1 instead (a LambdaLR built with last_epoch = k steps once, to k + 1).
    """
    for group in optimizer.param_groups:
        group["initial_lr"] = settings.learning_rate  # what a LambdaLR built with last_epoch >= 0 scales
    return get_constant_schedule_with_warmup(optimizer, settings.warmup_steps, last_epoch=steps_done)


class TrainingRun:
    """The mutable state of one training run: model, EMA, optimiser, warm-up, random stream, losses."""

    def __init__(self, settings, device, unet, ema, optimizer, lr_schedule, generator, identity):
        self.settings = settings
        self.device = device
        self.unet = unet
        self.ema = ema
        self.optimizer = optimizer
        self.lr_schedule = lr_schedule
        self.generator = generator  # CPU: every draw of training, the same on any device
        self.identity = identity  # what a checkpoint must match to be resumed
        self.noise_scheduler = paper_scheduler()
        self.step = 0
        self.losses: list[float] = []
        self.loss_average = 0.0  # exponential moving average of the losses, not bias-corrected

    @classmethod
    def create(cls, settings: PretrainSettings, device: torch.device, image_count: int, images_sha256: str):
        unet = build_unet(settings).to(device).train()
        optimizer = torch.optim.AdamW(
            unet.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay,
            fused=device.type in ("cpu", "cuda"),  # one kernel for all tensors: several times faster
        )
        generator = torch.Generator().manual_seed(settings.seed)
        training_settings = {
            key: value for key, value in dataclasses.asdict(settings).items() if key not in RESUMABLE_FIELDS
        }
        identity = {"settings": training_settings, "images": {"count": image_count, "sha256": images_sha256}}
        return cls(settings, device, unet, weight_ema(unet, settings.ema_decay), optimizer,
                   warmup_schedule(optimizer, settings, 0), generator, identity)

    def train_step(self, images: torch.Tensor) -> None:
        """One optimiser step on a random batch of uint8 (N, 3, S, S) `images`, then the EMA update."""
        batch_size = self.settings.batch_size
        # 1. Draw the batch, t and ε on the CPU generator.
        indices = torch.randint(len(images), (batch_size,), generator=self.generator)
        clean = images[indices].to(torch.float32) / 127.5 - 1.0  # (B, 3, S, S) in [-1, 1]
        if self.settings.horizontal_flips:
            flip = torch.rand(batch_size, generator=self.generator) < 0.5
            clean[flip] = clean[flip].flip(-1)
        timesteps = torch.randint(NUM_TRAIN_STEPS, (batch_size,), generator=self.generator)
        noise = torch.randn(clean.shape, generator=self.generator)
        # 2. x_t = sqrt(ᾱ_t)·x_0 + sqrt(1-ᾱ_t)·ε, one t per image, on the CPU (the same on every device).
        noisy = self.noise_scheduler.add_noise(clean, noise, timesteps).to(self.device)
        # 3. ε-prediction MSE, clipped gradients, warmed-up learning rate.
        autocast_dtype = AUTOCAST_DTYPES[self.settings.precision]
        with torch.autocast(self.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            prediction = self.unet(noisy, timesteps.to(self.device)).sample
        loss = F.mse_loss(prediction.float(), noise.to(self.device))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.settings.gradient_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.settings.gradient_clip)
        self.optimizer.step()
        self.lr_schedule.step()
        # 4. EMA of the weights, ramped so early averages are not dominated by the init.
        self.ema.step(self.unet.parameters())
        self.step += 1
        self.losses.append(loss.item())
        self.loss_average = LOSS_SMOOTHING * self.loss_average + (1.0 - LOSS_SMOOTHING) * self.losses[-1]

    @property
    def smoothed_loss(self) -> float:
        """The bias-corrected average, as Adam corrects its moments; NaN before the first step."""
        return self.loss_average / (1.0 - LOSS_SMOOTHING ** len(self.losses)) if self.losses else float("nan")

    def ema_unet(self) -> UNet2DModel:
        """A copy of the UNet holding the EMA weights, in eval mode: the model that is sampled and saved."""
        averaged = copy.deepcopy(self.unet).eval().requires_grad_(False)
        self.ema.copy_to(averaged.parameters())
        return averaged

    def state_dict(self) -> dict:
        """Tensors and plain containers only (`torch.load(weights_only=True)` reads it back)."""
        names = [name for name, _ in self.unet.named_parameters()]
        ema_state = self.ema.state_dict()
        return {
            "format": STATE_FORMAT,
            "step": self.step,
            **self.identity,
            "all_settings": dataclasses.asdict(self.settings),
            "model": self.unet.state_dict(),
            "ema": dict(zip(names, ema_state.pop("shadow_params"), strict=True)),  # by name, as the model
            "ema_state": ema_state,
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "generator": self.generator.get_state(),
            "losses": torch.tensor(self.losses, dtype=torch.float64),
        }

    def restore(self, state: dict, source: Path) -> None:
        """Load a checkpoint after checking it belongs to this run.

        Raises:
            ValueError: Another format, other settings or images, or more steps than asked for.
        """
        if state.get("format") not in _READABLE_FORMATS:
            raise ValueError(f"{source}: unknown training state format {state.get('format')!r} (this code reads "
                             f"{list(_READABLE_FORMATS)}); delete it or use another output folder to start afresh")
        _check_same_run(state, self.identity, source)
        step = int(state["step"])
        if step > self.settings.steps:
            raise ValueError(
                f"{source}: the run is already at step {step}, past steps={self.settings.steps}; "
                "ask for at least as many steps, or use another output folder"
            )
        self.unet.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        shadow = [state["ema"][name] for name, _ in self.unet.named_parameters()]
        if state["format"] == 1:
            # EMA counters and warm-up as format 2 would hold them: functions of the step count alone.
            logger.info("%s: a format-1 training state; its EMA and warm-up counters follow from step %d",
                        source, step)
            self.ema.load_state_dict({"optimization_step": step, "shadow_params": shadow})
            self.lr_schedule = warmup_schedule(self.optimizer, self.settings, step)
        else:
            self.ema.load_state_dict({**state["ema_state"], "shadow_params": shadow})
            self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.ema.to(device=self.device)
        self.generator.set_state(state["generator"])
        self.step = step
        self.losses = state["losses"].tolist()
        for loss in self.losses:
            self.loss_average = LOSS_SMOOTHING * self.loss_average + (1.0 - LOSS_SMOOTHING) * loss


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


def save_state(state: dict, path: Path) -> None:
    """torch.save to a staging file, then rename: a kill never leaves a half-written state."""
    with replaced_file(path) as staging:
        torch.save(state, staging)
        pause_point("pretrain-state-staged", state["step"])


def load_state(path: Path) -> dict:
    """A `state.pt` read with `weights_only=True` (a planted pickle never runs).

    Raises:
        ValueError: naming the file when it cannot be read.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError, RuntimeError (truncated zip), EOFError, ...
        raise ValueError(f"{path}: not a readable training state ({error}); delete it to start afresh") from error
