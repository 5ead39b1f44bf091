"""The raw-pixel baseline as a feature source: each pixel's RGB values and its neighbours'.

One tap at full resolution, no steps, no model: written into an ordinary store, so the same
sampler, ensemble and evaluation run on it and the comparison measures the features only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.sizes import ImageShape, as_shape
from pipeline.sources.base import TapShape


class PixelSource:
    """Raw pixels: one tap, `pixels.rgb<n>x<n>`, of 3·n² channels at the image's resolution."""

    steps: list[int] = []

    def __init__(self, neighbourhood: int = 3):
        if neighbourhood < 1 or neighbourhood % 2 == 0:
            raise ValueError(f"the neighbourhood must be an odd width ≥ 1, got {neighbourhood}")
        self.neighbourhood = neighbourhood
        self.taps = [f"pixels.rgb{neighbourhood}x{neighbourhood}"]
        self.device = torch.device("cpu")
        self.size_multiple = 1

    def provenance(self) -> dict:
        return {"kind": "pixels", "neighbourhood": self.neighbourhood}

    def tap_shapes(self, size: int | ImageShape) -> list[TapShape]:
        return [TapShape(self.taps[0], 3 * self.neighbourhood**2, *as_shape(size))]

    def feature_maps(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        maps = [neighbourhood_features(image, self.neighbourhood) for image in images.float().cpu()]
        return {self.taps[0]: torch.stack(maps)[:, None]}  # (B, 1, 3·n², S, S)


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

