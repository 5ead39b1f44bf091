"""Uniform multinomial diffusion over label maps (the forward process of DDPS).

A label map x_0 with K classes is noised in T steps; at step t each pixel keeps its class with
probability ᾱ_t and is otherwise redrawn uniformly from the K classes, so

    q(x_t | x_0) = ᾱ_t · onehot(x_0) + (1 − ᾱ_t) / K

with no absorbing state. ᾱ follows a cosine schedule: 1 at t = 0, 0 at t = T (a random map).
"""

from __future__ import annotations

import math

import torch


class MaskDiffusion:
    """The forward process for `num_classes` classes and `steps` = T steps."""

    def __init__(self, num_classes: int, steps: int):
        if num_classes < 2 or steps < 1:
            raise ValueError(f"mask diffusion needs at least 2 classes and 1 step, got {num_classes}, {steps}")
        self.num_classes, self.steps = num_classes, steps
        t = torch.arange(steps + 1, dtype=torch.float64)
        self.alpha_bar = (torch.cos(0.5 * math.pi * t / steps) ** 2).float()  # (T+1,)
        self.alpha_bar[-1] = 0.0  # exactly a random map at T

    def marginals(self, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0) per pixel: float32 (B, K, H, W) for labels x0 int64 (B, H, W) and steps t (B,)."""
        alpha = self.alpha_bar[t].to(x0.device)[:, None, None, None]  # (B, 1, 1, 1)
        one_hot = torch.nn.functional.one_hot(x0, self.num_classes).permute(0, 3, 1, 2).float()  # (B, H, W, K) -> (B, K, H, W)
        return alpha * one_hot + (1.0 - alpha) / self.num_classes

    def sample(self, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A draw of x_t ~ q(x_t | x_0): int64 (B, H, W)."""
        alpha = self.alpha_bar[t].to(x0.device)[:, None, None]  # (B, 1, 1)
        # Drawn on the CPU (where the generator lives) for the same maps on any device.
        keep = torch.rand(x0.shape, generator=generator).to(x0.device) < alpha
        redrawn = torch.randint(0, self.num_classes, x0.shape, generator=generator).to(x0.device)
        return torch.where(keep, x0, redrawn)
