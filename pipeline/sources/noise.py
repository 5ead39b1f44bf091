"""The forward (noising) process of a DDPM with the linear β schedule the paper's models use."""

from __future__ import annotations

import torch

NUM_TRAIN_STEPS = 1000


def linear_alphas_cumprod(
    num_steps: int = NUM_TRAIN_STEPS, beta_start: float = 1e-4, beta_end: float = 0.02
) -> torch.Tensor:
    """ᾱ_t for t = 0..num_steps-1, float64 (num_steps,)."""
    betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def shared_noise(seed: int, size: int) -> torch.Tensor:
    """The one noise image shared by every image and step, float32 (1, 3, size, size).

    Drawn on the CPU from its own generator so that a seed gives the same features on
    every device.
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, 3, size, size, generator=generator)


def q_sample(images: torch.Tensor, step: int, noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(ᾱ_t)·x_0 + sqrt(1-ᾱ_t)·ε.

    Args:
        images: x_0 in [-1, 1], (B, 3, H, W).
        step: the integer step t.
        noise: ε, broadcastable to `images`, e.g. (1, 3, H, W).
        alphas_cumprod: from `linear_alphas_cumprod`.

    Returns:
        x_t with the dtype of `images`, (B, 3, H, W).
    """
    if not 0 <= step < len(alphas_cumprod):
        raise ValueError(f"step {step} is outside 0..{len(alphas_cumprod) - 1}")
    alpha_bar = alphas_cumprod[step].item()
    return alpha_bar**0.5 * images + (1.0 - alpha_bar) ** 0.5 * noise.to(images.device, images.dtype)
