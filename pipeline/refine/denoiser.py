"""The refiner's network: a small time-conditioned convolutional net that predicts a clean label
map from a noisy one and what the image shows.

Input per pixel: the conditioning channels (`conditioning`) and a learned embedding of the noisy
map's class; the step t enters every block as a scale and shift of its features (FiLM). The
body is residual blocks of dilated 3×3 convolutions at full resolution (dilations 1, 2, 4, 8,
16, 1: a receptive field of 129 pixels), so the net sees a part's surroundings without any
downsampling. Output: class logits of x_0, (B, K, H, W).
"""

from __future__ import annotations

import torch
from torch import nn

DILATIONS = (1, 2, 4, 8, 16, 1)


class FiLMBlock(nn.Module):
    """Two dilated 3×3 convolutions with a residual connection; the step scales and shifts the middle."""

    def __init__(self, width: int, dilation: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation)
        self.norm2 = nn.GroupNorm(8, width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation)

    def forward(self, features: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        hidden = self.conv1(nn.functional.silu(self.norm1(features)))
        hidden = self.norm2(hidden) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        return features + self.conv2(nn.functional.silu(hidden))


class MaskDenoiser(nn.Module):
    """(conditioning (B, C, H, W), noisy labels (B, H, W), steps (B,)) → logits of x_0 (B, K, H, W)."""

    def __init__(self, condition_channels: int, num_classes: int, steps: int, width: int = 32):
        super().__init__()
        self.num_classes = num_classes
        self.mask_embedding = nn.Embedding(num_classes, width)
        self.step_embedding = nn.Embedding(steps + 1, width)
        self.input = nn.Conv2d(condition_channels + width, width, 3, padding=1)
        self.blocks = nn.ModuleList(FiLMBlock(width, dilation) for dilation in DILATIONS)
        self.films = nn.ModuleList(nn.Linear(width, 2 * width) for _ in DILATIONS)
        self.output = nn.Sequential(nn.GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, num_classes, 1))

    def forward(self, conditioning: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        mask = self.mask_embedding(noisy).permute(0, 3, 1, 2)  # (B, H, W, width) -> (B, width, H, W)
        features = self.input(torch.cat([conditioning, mask], dim=1))
        step = nn.functional.silu(self.step_embedding(t))  # (B, width)
        for block, film in zip(self.blocks, self.films):
            scale, shift = film(step).chunk(2, dim=1)
            features = block(features, scale, shift)
        return self.output(features)
