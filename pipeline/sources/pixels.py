"""The raw-pixel baseline's features: each pixel's RGB values and its neighbours'."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

PIXEL_BLOCK = -1  # the block index recorded for raw pixels (no UNet block)


def neighbourhood_features(image: torch.Tensor, neighbourhood: int) -> torch.Tensor:
    """Stacks every pixel's neighbourhood×neighbourhood RGB values (edges replicated).

    Args:
        image: float (3, S, S) in [-1, 1].
        neighbourhood: odd window width; 1 gives plain RGB.

    Returns:
        float (3 · neighbourhood², S, S).
    """
    if neighbourhood < 1 or neighbourhood % 2 == 0:
        raise ValueError(f"the neighbourhood must be an odd width ≥ 1, got {neighbourhood}")
    radius = neighbourhood // 2
    padded = F.pad(image[None], (radius,) * 4, mode="replicate")  # (1, 3, S + 2r, S + 2r)
    windows = F.unfold(padded, kernel_size=neighbourhood)  # (1, 3·n², S·S)
    size = image.shape[-1]
    return windows.reshape(3 * neighbourhood**2, size, size)

