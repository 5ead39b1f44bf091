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

from pipeline.backbones import Backbone, decoder_block, load_backbone
from pipeline.config import ExtractSettings
from pipeline.datasets import (
    ClassInfo,
    ImageRecord,
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
from pipeline.storage import store_location
from pipeline.store import BlockShape, ExtractionSummary, FeatureStoreWriter, StoreSchema, open_store_for_writing

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


class InProcessBatches:
    """Runs the batches one after the other in this process, on one loaded model."""

    def __init__(self, checkpoint: str | Path, settings: ExtractSettings):
        self.settings = settings
        self.extractor = load_extractor(checkpoint, settings.blocks, settings.device)
        self.where = str(self.extractor.device)

    def describe(self) -> ModelDescription:
        return describe_model(self.extractor, self.settings.size)

    def run(
        self, writer: FeatureStoreWriter, records: Sequence[ImageRecord], batches: list[list[int]],
        classes: ClassInfo | None,
    ) -> Iterator[tuple[int, int]]:
        """Extracts each batch; yields (images it covered, images this run wrote) as it goes.

        Images another process holds (a claim on a local store) are skipped, then waited for at
        the end and written here if that process died: a run that returns leaves a complete store.
        """
        def write(claimed: list[int]) -> int:
            chosen = {index: records[index] for index in claimed}
            return extract_batch(self.extractor, writer, chosen, claimed, self.settings, classes) if claimed else 0

        for batch in batches:
            with writer.claim(batch) as claimed:
                written = write(claimed)
            yield len(batch), written
        for index in writer.pending_images():  # held by another writer a moment ago
            with writer.claim([index], wait=True) as claimed:
                yield 0, write(claimed)


@contextlib.contextmanager
def batch_runner(checkpoint: str | Path, settings: ExtractSettings):
    """In-process batches, or the Dask cluster's when `settings.scheduler` names one."""
    if settings.scheduler is None:
        yield InProcessBatches(checkpoint, settings)
        return
    from pipeline.cluster import cluster_client
    from pipeline.distributed import ClusterBatches

    with cluster_client(settings.scheduler) as client, ClusterBatches(client, checkpoint, settings) as batches:
        yield batches


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

    With `settings.scheduler` set, the batches run as tasks on that Dask cluster (each worker
    loads the model once and writes its images straight into the store); without, in this process.

    Args:
        checkpoint: guided-diffusion or diffusers checkpoint.
        images_dir: folder of PNG/JPEG images with optional same-stem `.npy` label maps.
        store_path: the store to create or complete: a folder or a URL (s3://…, gs://…).
        settings: steps, blocks, seed, size, layout, batch size, device, codec, scheduler.
        classes: class names and ignore label, recorded in the store.
        replace_mismatched: replace a store that holds other features instead of refusing.
        show_progress: show a progress bar.
    """
    started = time.perf_counter()
    store_path = store_location(store_path)
    # 1. The inputs: images (hashed, so a changed image is a changed store).
    records = list_images(images_dir)
    check_labels_complete(records, images_dir)
    check_examples(records, classes)
    with batch_runner(checkpoint, settings) as runner:
        # 2. The store, created from its full schema or reopened to resume.
        model = runner.describe()
        schema = StoreSchema(
            layout=settings.layout,
            image_size=settings.size,
            steps=list(settings.steps),
            block_shapes=model.block_shapes,
            checkpoint_sha256=model.checkpoint_sha256,
            architecture=model.architecture,
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
        batches = [pending[start : start + settings.batch_size] for start in range(0, len(pending), settings.batch_size)]
        written = 0
        with tqdm(total=len(pending), unit="image", desc="extract", disable=not show_progress) as progress, \
                _disk_full_explained(store_path, writer):
            for covered, written_now in runner.run(writer, records, batches, classes):
                progress.update(covered)
                written += written_now
    return ExtractionSummary(
        store_path=store_path,
        images_total=len(records),
        images_written=written,
        feature_dim=schema.feature_dim,
        seconds=time.perf_counter() - started,
        device=runner.where,
    )
