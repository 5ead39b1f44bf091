"""A pixel-space diffusion UNet as a feature source: noised images in, decoder activations out."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from pipeline.runtime.devices import autocast_for, pick_device
from pipeline.sources.adm.blocks import decoder_block
from pipeline.sources.checkpoints import Backbone, load_backbone
from pipeline.sources.hooks import capture_outputs, run_until_captured
from pipeline.sources.noise import add_noise, paper_scheduler
from pipeline.store.schema import BlockShape

logger = logging.getLogger(__name__)


def compute_activations(
    unet: torch.nn.Module,
    block_modules: Mapping[int, torch.nn.Module],
    images: torch.Tensor,
    steps: Sequence[int],
    noise: torch.Tensor,
) -> list[torch.Tensor]:
    """Runs the UNet on noised images and returns the chosen decoder blocks' outputs.

    Args:
        unet: a diffusers UNet2DModel.
        block_modules: block index → module, in feature order.
        images: x_0 in [-1, 1] on the UNet's device, (B, 3, S, S).
        steps: the steps t, in feature order.
        noise: the shared noise (1, 3, S, S).

    Returns:
        Per (step, block), step-major, a float32 CPU tensor (B, C_b, h_b, w_b).
    """
    scheduler = paper_scheduler()
    names = {f"block_{block}": module for block, module in block_modules.items()}
    last_needed = f"block_{max(block_modules)}"  # decoder blocks run in index order
    activations = []
    with torch.inference_mode(), capture_outputs(names, stop_after=last_needed) as outputs:
        for step in steps:
            noisy = add_noise(images, step, noise, scheduler)
            timesteps = torch.full((len(images),), step, dtype=torch.long, device=images.device)
            with autocast_for(images.device):
                run_until_captured(unet, noisy, timesteps)
            activations.extend(outputs[name].float().cpu() for name in names)
    return activations


def probe_block_shapes(
    unet: torch.nn.Module, block_modules: Mapping[int, torch.nn.Module], size: int, device: torch.device
) -> list[BlockShape]:
    """Each chosen block's activation shape for a size×size input (one forward on zeros)."""
    images = torch.zeros(1, 3, size, size, device=device)
    activations = compute_activations(unet, block_modules, images, [0], torch.zeros(1, 3, size, size))
    return [
        BlockShape(block, *activation.shape[1:]) for block, activation in zip(block_modules, activations)
    ]


@dataclasses.dataclass(frozen=True)
class FeatureExtractor:
    """A UNet on its device and the decoder blocks to capture: what one process needs to extract."""

    backbone: Backbone
    block_modules: dict[int, torch.nn.Module]
    device: torch.device


def load_extractor(checkpoint: str | Path, blocks: Sequence[int], device: str) -> FeatureExtractor:
    """Loads a checkpoint onto the device ("auto" picks one) with its chosen decoder blocks."""
    backbone = load_backbone(checkpoint)
    torch_device = pick_device(device)
    unet = backbone.unet.to(torch_device).eval()
    return FeatureExtractor(backbone, {block: decoder_block(unet, block) for block in blocks}, torch_device)

