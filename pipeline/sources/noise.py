"""Forward noising through diffusers' schedulers, and the one noise image every image shares.

The paper's guided-diffusion models were trained with 1000 steps of the linear β schedule
(β from 1e-4 to 0.02); `paper_scheduler` is that schedule as a diffusers `DDPMScheduler`. A
diffusers model folder that ships its own `scheduler/` config is noised with that one instead
(`pipeline.sources.checkpoints` decides).

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


def add_noise(images: torch.Tensor, step: int, noise: torch.Tensor, scheduler: SchedulerMixin) -> torch.Tensor:
    """x_t = sqrt(ᾱ_t)·x_0 + sqrt(1-ᾱ_t)·ε at one step t for the whole batch (`scheduler.add_noise`).

    Args:
        images: x_0, (B, C, H, W).
        step: the integer step t.
        noise: ε, broadcastable to `images`, e.g. (1, C, H, W).
        scheduler: a diffusers scheduler with `add_noise` (its own ᾱ schedule).

    Returns:
        x_t with the dtype and device of `images`, (B, C, H, W).
    """
    steps = scheduler.config.num_train_timesteps
    if not 0 <= step < steps:
        raise ValueError(f"step {step} is outside 0..{steps - 1} (the scheduler's training steps)")
    timesteps = torch.full((len(images),), step, dtype=torch.long, device=images.device)
    return scheduler.add_noise(images, noise.to(images.device, images.dtype).expand_as(images), timesteps)
