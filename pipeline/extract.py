"""The extract stage: images → noised copies → UNet decoder activations → feature store."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.backbones import decoder_block, load_backbone
from pipeline.config import ExtractSettings
from pipeline.datasets import (
    ClassInfo,
    file_sha256,
    list_images,
    check_examples,
    check_labels_complete,
    load_example,
    model_input_to_uint8,
)
from pipeline.devices import autocast_for, pick_device
from pipeline.diffusion import linear_alphas_cumprod, q_sample, shared_noise
from pipeline.hooks import capture_outputs, run_until_captured
from pipeline.store import BlockShape, FeatureStoreWriter, StoreSchema, open_store_for_writing

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ExtractionSummary:
    """What an extraction did."""

    store_path: Path
    images_total: int
    images_written: int  # by this run (not by another process working on the same store)
    feature_dim: int
    seconds: float
    device: str


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


@contextlib.contextmanager
def _disk_full_explained(store_path: str | Path, writer: FeatureStoreWriter | None) -> Iterator[None]:
    """Turns "no space left on device" into a message that says what is safe and what to do."""
    try:
        yield
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        if writer is None:
            state = "no store was created"
        else:
            total = len(writer.schema.image_names)
            state = (
                f"the {total - len(writer.pending_images())} of {total} images finished so far are complete and "
                "checksummed"
            )
        raise OSError(
            error.errno,
            f"disk full while writing the feature store {store_path} ({error.strerror}): {state}; free some space "
            "and re-run extract to finish",
        ) from error


def extract_features(
    checkpoint: str | Path,
    images_dir: str | Path,
    store_path: str | Path,
    settings: ExtractSettings,
    classes: ClassInfo | None = None,
    replace_mismatched: bool = False,
    show_progress: bool = True,
) -> ExtractionSummary:
    """Extracts every image's features of a folder into a store, resuming unfinished work.

    Args:
        checkpoint: guided-diffusion or diffusers checkpoint.
        images_dir: folder of PNG/JPEG images with optional same-stem `.npy` label maps.
        store_path: the store to create or complete.
        settings: steps, blocks, seed, size, layout, batch size, device, codec.
        classes: class names and ignore label, recorded in the store.
        replace_mismatched: replace a store that holds other features instead of refusing.
        show_progress: show a progress bar.
    """
    started = time.perf_counter()
    # 1. The inputs: images (hashed, so a changed image is a changed store) and the model.
    records = list_images(images_dir)
    check_labels_complete(records, images_dir)
    check_examples(records, classes)
    backbone = load_backbone(checkpoint)
    device = pick_device(settings.device)
    unet = backbone.unet.to(device).eval()
    block_modules = {block: decoder_block(unet, block) for block in settings.blocks}
    # 2. The store, created from its full schema or reopened to resume.
    schema = StoreSchema(
        layout=settings.layout,
        image_size=settings.size,
        steps=list(settings.steps),
        block_shapes=probe_block_shapes(unet, block_modules, settings.size, device),
        checkpoint_sha256=backbone.checkpoint_sha256,
        architecture=backbone.architecture,
        noise_seed=settings.seed,
        image_names=[record.name for record in records],
        image_sha256=[file_sha256(record.image_path) for record in records],
        classes=None if classes is None else {"names": classes.names, "ignore_label": classes.ignore_label},
    )
    with _disk_full_explained(store_path, None):
        writer = open_store_for_writing(store_path, schema, settings.codec, replace_mismatched)
    pending = writer.pending_images()
    if len(pending) < len(records):
        logger.info("%s: %d of %d images already done", store_path, len(records) - len(pending), len(records))
    # 3. Batches of pending images through the UNet, each image written as soon as it is done.
    #    Images another process is writing are skipped, then waited for at the end (and written
    #    here if that process died): any run that returns leaves a complete store.
    noise = shared_noise(settings.seed, settings.size)

    def write_batch(batch: list[int]) -> int:
        examples = [load_example(records[index], settings.size, classes) for index in batch]
        images = np.stack([image for image, _ in examples])  # (B, 3, S, S)
        activations = compute_activations(unet, block_modules, torch.from_numpy(images).to(device), settings.steps, noise)
        for position, index in enumerate(batch):
            writer.write_image(
                index, model_input_to_uint8(images[position]), examples[position][1], [a[position] for a in activations]
            )
        return len(batch)

    written = 0
    with tqdm(total=len(pending), unit="image", desc="extract", disable=not show_progress) as progress, \
            _disk_full_explained(store_path, writer):
        for start in range(0, len(pending), settings.batch_size):
            with writer.claim(pending[start : start + settings.batch_size]) as batch:
                written += write_batch(batch) if batch else 0
            progress.update(min(settings.batch_size, len(pending) - start))
        for index in writer.pending_images():  # held by another writer a moment ago
            with writer.claim([index], wait=True) as batch:
                written += write_batch(batch) if batch else 0
    return ExtractionSummary(
        store_path=Path(store_path),
        images_total=len(records),
        images_written=written,
        feature_dim=schema.feature_dim,
        seconds=time.perf_counter() - started,
        device=str(device),
    )
