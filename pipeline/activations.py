"""Extraction's compute: a model's decoder activations for a batch of images, written to a store.

`extract_batch` is what every runner calls, in this process (pipeline/extract.py) or on a Dask
worker (pipeline/distributed.py); neither of those is imported here, so there is no cycle.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from pipeline.backbones import Backbone, decoder_block, load_backbone
from pipeline.config import ExtractSettings
from pipeline.datasets import ClassInfo, ImageRecord, load_example, model_input_to_uint8
from pipeline.devices import autocast_for, pick_device
from pipeline.diffusion import linear_alphas_cumprod, q_sample, shared_noise
from pipeline.hooks import capture_outputs, run_until_captured
from pipeline.store import BlockShape, FeatureStoreWriter

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
    alphas_cumprod = linear_alphas_cumprod()
    names = {f"block_{block}": module for block, module in block_modules.items()}
    last_needed = f"block_{max(block_modules)}"  # decoder blocks run in index order
    activations = []
    with torch.inference_mode(), capture_outputs(names, stop_after=last_needed) as outputs:
        for step in steps:
            noisy = q_sample(images, step, noise, alphas_cumprod)
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


@dataclasses.dataclass(frozen=True)
class ModelDescription:
    """What a store's schema records about the model."""

    block_shapes: list[BlockShape]
    checkpoint_sha256: str
    architecture: dict


def describe_model(extractor: FeatureExtractor, size: int) -> ModelDescription:
    """The chosen blocks' shapes at size×size, the checkpoint's hash and the architecture."""
    return ModelDescription(
        block_shapes=probe_block_shapes(extractor.backbone.unet, extractor.block_modules, size, extractor.device),
        checkpoint_sha256=extractor.backbone.checkpoint_sha256,
        architecture=extractor.backbone.architecture,
    )


def extract_batch(
    extractor: FeatureExtractor,
    writer: FeatureStoreWriter,
    records: Mapping[int, ImageRecord],
    batch: Sequence[int],
    settings: ExtractSettings,
    classes: ClassInfo | None = None,
) -> int:
    """Extracts one batch of images into an open store: the unit of work, in-process and on a cluster.

    Images already marked done are not written again, so a retried batch does no harm. The whole
    batch still goes through the UNet together, so no image's features depend on what was retried.
    Each image is its own region of every array: batches never share a chunk and need no lock.

    Args:
        extractor: the model.
        writer: the store, open for writing.
        records: store index → image (at least those of the batch).
        batch: store indices of the images to extract.
        settings: steps, seed and size.
        classes: to check the label maps against.

    Returns:
        How many images this call wrote.
    """
    pending = set(writer.pending_among(batch))
    if not pending:
        return 0
    examples = [load_example(records[index], settings.size, classes) for index in batch]
    images = np.stack([image for image, _ in examples])  # (B, 3, S, S)
    noise = shared_noise(settings.seed, settings.size)
    activations = compute_activations(
        extractor.backbone.unet, extractor.block_modules, torch.from_numpy(images).to(extractor.device),
        settings.steps, noise,
    )
    for position, index in enumerate(batch):
        if index in pending:
            image, labels = model_input_to_uint8(images[position]), examples[position][1]
            writer.write_image(index, image, labels, [activation[position] for activation in activations])
    return len(pending)
