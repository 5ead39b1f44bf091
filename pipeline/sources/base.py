"""What every feature source provides: named feature maps for a batch of images, and their shapes.

A feature source turns images into named feature maps ("taps"): a diffusion UNet's decoder
modules at a few noise steps (`diffusion_unet.UNetSource`), or the raw pixels themselves
(`pixels.PixelSource`). Extraction, the store and the heads see only this protocol, so a new
kind of model is one new module here.

Feature order, everywhere: step-major, then taps in the order given. A source without steps
(raw pixels) has `steps == []` and one map per tap.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch

from pipeline.sizes import ImageShape

# In a list of taps, this word names every decoder block (a UNet's numbered taps), in order.
ALL_DECODER_BLOCKS = "decoder"


@dataclasses.dataclass(frozen=True)
class TapShape:
    """One tap's feature map shape for one image (the same at every step), and the
    guided-diffusion decoder block number that names the same module, if it has one."""

    name: str
    channels: int
    height: int
    width: int
    block: int | None = None


class FeatureSource(Protocol):
    """A model (or none) that turns images into named feature maps.

    Attributes:
        steps: the diffusion steps t, in feature order; [] for a source without steps.
        taps: the names of the feature maps, in feature order.
        device: where `feature_maps` wants its input.
        size_multiple: both sides of an input must be multiples of this (the model's total
            downsampling; 1 for a source that takes any size).
    """

    steps: list[int]
    taps: list[str]
    device: torch.device
    size_multiple: int

    def provenance(self) -> dict:
        """JSON-serialisable, tagged by "kind": equal provenance and inputs give equal features."""
        ...

    def tap_shapes(self, size: int | ImageShape) -> list[TapShape]:
        """Each tap's (C, h, w) for an input of `size` (S: S×S, or (H, W)), in tap order."""
        ...

    def feature_maps(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Images (B, 3, H, W) in [-1, 1] on `device` → tap name → float32 (B, T, C, h, w) on
        `device`, T = max(1, len(steps)), steps in order."""
        ...


def steps_per_tap(steps: list[int]) -> int:
    """How many maps each tap has per image: one per step, one for a source without steps."""
    return max(1, len(steps))
