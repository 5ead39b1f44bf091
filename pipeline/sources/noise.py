"""Forward noising through diffusers' schedulers, and the one noise image every image shares.

The paper's guided-diffusion models were trained with 1000 steps of the linear β schedule
(β from 1e-4 to 0.02); `paper_scheduler` is that schedule as a diffusers `DDPMScheduler`. A
diffusers model folder that ships its own `scheduler/` config is noised with that one instead
(`pipeline.sources.checkpoints` decides). The schedule comes from the scheduler's configuration;
the noising keeps guided-diffusion's float64 arithmetic (`alphas_cumprod_float64`).

The noise is the same for every image and every step (the paper's choice), drawn on the CPU
from its own seeded generator so a seed gives the same features on every device.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, SchedulerMixin

NUM_TRAIN_STEPS = 1000


def paper_scheduler() -> DDPMScheduler:
    """The linear β schedule of the paper's models: 1000 steps, β_t from 1e-4 to 0.02."""
    return DDPMScheduler(num_train_timesteps=NUM_TRAIN_STEPS, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


def shared_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The one noise tensor shared by every image and step, float32 of `shape` (e.g. (1, 3, S, S))."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def alphas_cumprod_float64(scheduler: SchedulerMixin) -> torch.Tensor:
    """ᾱ_t for t = 0..T-1 in float64, (T,), from the scheduler's configuration.

    diffusers computes its schedule, and `add_noise` its square roots, in float32; guided-diffusion,
    whose models the paper uses, in float64. With diffusers' arithmetic 0.5 % of the demo's stored
    float16 features moved by one unit in the last place and its mIoU by up to 0.35 points
    (random weights; measured with `dvc repro`), so for a linear β schedule this recomputes it in
    float64 as guided-diffusion does. Other schedules keep the scheduler's own values.
    """
    config = scheduler.config
    if config.get("beta_schedule") != "linear" or config.get("trained_betas") is not None:
        return scheduler.alphas_cumprod.double()
    betas = torch.linspace(config.beta_start, config.beta_end, config.num_train_timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def add_noise(images: torch.Tensor, step: int, noise: torch.Tensor, scheduler: SchedulerMixin) -> torch.Tensor:
    """x_t = sqrt(ᾱ_t)·x_0 + sqrt(1-ᾱ_t)·ε at one step t for the whole batch: the scheduler's
    schedule (`alphas_cumprod_float64`), square roots in float64 as guided-diffusion takes them.

    Args:
        images: x_0, (B, C, H, W).
        step: the integer step t.
        noise: ε, broadcastable to `images`, e.g. (1, C, H, W).
        scheduler: a diffusers noise scheduler (its configuration defines the schedule).

    Returns:
        x_t with the dtype and device of `images`, (B, C, H, W).
    """
    steps = scheduler.config.num_train_timesteps
    if not 0 <= step < steps:
        raise ValueError(f"step {step} is outside 0..{steps - 1} (the scheduler's training steps)")
    alpha_bar = alphas_cumprod_float64(scheduler)[step].item()
    return alpha_bar**0.5 * images + (1.0 - alpha_bar) ** 0.5 * noise.to(images.device, images.dtype)
