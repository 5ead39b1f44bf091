"""Shared test helpers: synthetic feature stores and tiny image folders."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.sources.base import TapShape
from pipeline.store.schema import StoreSchema
from pipeline.store.writer import open_store_for_writing

# Tiny models everywhere: one thread is as fast, and immune to a busy neighbour process.
torch.set_num_threads(1)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED = PROJECT_ROOT.parent / "shared"

# `-n auto` (pyproject.toml) runs the tests on this many pytest-xdist workers: one per CPU this
# process may use, at most 4 (each worker imports its own torch and diffusers).
MAX_TEST_WORKERS = 4


def pytest_xdist_auto_num_workers(config) -> int:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(usable, MAX_TEST_WORKERS))


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked slow go first, so no worker is left running one alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: order kept otherwise

# Three taps at three resolutions, two steps: D = 2 * (6 + 4 + 2) = 24.
TAP_SHAPES = [TapShape("decoder.5", 6, 4, 4, block=5), TapShape("decoder.8", 4, 8, 8, block=8),
              TapShape("decoder.12", 2, 16, 16, block=12)]
STEPS = [50, 150]


def synthetic_activations(seed: int) -> list[torch.Tensor]:
    """Smooth random activations per (step, tap), step-major."""
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(shape.channels, shape.height, shape.width, generator=generator)
        for _ in STEPS
        for shape in TAP_SHAPES
    ]


def as_feature_maps(tables: list[torch.Tensor], tap_shapes=TAP_SHAPES) -> dict[str, torch.Tensor]:
    """Tables per (step, tap) in feature order → tap name → (T, C, h, w), what `write_image` takes."""
    taps = len(tap_shapes)
    return {shape.name: torch.stack(tables[position::taps]) for position, shape in enumerate(tap_shapes)}


def synthetic_schema(layout: str, num_images: int, size: int = 16, classes: dict | None = None) -> StoreSchema:
    return StoreSchema(
        layout=layout,
        image_size=size,
        steps=STEPS,
        tap_shapes=TAP_SHAPES,
        source={"kind": "synthetic", "checkpoint_sha256": "0" * 64, "noise_seed": 0},
        image_names=[f"image_{index:02d}" for index in range(num_images)],
        image_sha256=["1" * 64] * num_images,
        classes=classes or {"names": ["background", "round", "square"], "ignore_label": 255},
    )


def write_synthetic_store(path: Path, layout: str, labels: list[np.ndarray | None], size: int = 16):
    """A complete store of synthetic activations; returns the schema and the activations written."""
    schema = synthetic_schema(layout, len(labels), size)
    writer = open_store_for_writing(path, schema)
    written = []
    for index, label_map in enumerate(labels):
        activations = synthetic_activations(index)
        image = np.full((size, size, 3), index, dtype=np.uint8)
        writer.write_image(index, image, label_map, as_feature_maps(activations))
        written.append(activations)
    return schema, written


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is not present (fixtures and datasets live there)")
    return SHARED


def write_image_folder(folder: Path, count: int, size: int | tuple[int, int] = 32, labeled: bool = True, seed: int = 0) -> Path:
    """Random RGB PNGs with 3-class label maps (a bright square is class 2, a dark disc class 1);
    `size`: S for S×S, or (H, W)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    height, width = (size, size) if isinstance(size, int) else size
    side = min(height, width)
    yy, xx = np.mgrid[:height, :width]
    for index in range(count):
        image = rng.integers(60, 120, size=(height, width, 3), dtype=np.uint8)
        labels = np.zeros((height, width), dtype=np.uint8)
        cy, cx = rng.integers(side // 4, 3 * side // 4, size=2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < (side // 6) ** 2
        image[disc] = 20
        labels[disc] = 1
        top, left = rng.integers(0, side - side // 4, size=2)
        image[top : top + side // 4, left : left + side // 4] = 230
        labels[top : top + side // 4, left : left + side // 4] = 2
        Image.fromarray(image).save(folder / f"img_{index:03d}.png")
        if labeled:
            np.save(folder / f"img_{index:03d}.npy", labels)
    return folder


def write_learnable_store(path, count=4, size=16, seed=0, round_side=6, signal=4.0, noise=0.0):
    """A store whose last block (16×16, 2 channels) encodes the label: the ensemble can learn it.

    Class 1 is a round_side × round_side square (36 pixels by default; 2: a part of 4 pixels),
    class 2 the last 5 columns (80 pixels), the rest background. The two channels are
    `signal` × each class's indicator, plus normal noise of std `noise`.
    """
    rng = np.random.default_rng(seed)
    schema = synthetic_schema("native", count, size)
    writer = open_store_for_writing(path, schema)
    all_labels = []
    for index in range(count):
        labels = np.zeros((size, size), dtype=np.int64)
        top, left = rng.integers(0, size - round_side), rng.integers(0, size - 5 - round_side)
        labels[top : top + round_side, left : left + round_side] = 1  # clear of class 2's columns
        labels[:, -5:] = 2  # 80 pixels
        activations = synthetic_activations(index + 1000 * seed)
        for step_position in range(len(STEPS)):
            last = activations[step_position * len(TAP_SHAPES) + len(TAP_SHAPES) - 1]  # (2, 16, 16)
            last[0] = torch.from_numpy(signal * (labels == 1) + noise * rng.standard_normal((size, size)))
            last[1] = torch.from_numpy(signal * (labels == 2) + noise * rng.standard_normal((size, size)))
        writer.write_image(index, np.zeros((size, size, 3), np.uint8), labels, as_feature_maps(activations))
        all_labels.append(labels)
    return all_labels


FEWSHOT_SIZE = 16  # pixels (UNet2DModel) or latent side (UNet2DConditionModel) of the few-shot tests
FEWSHOT_TEXT = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(7))  # (1, L, D) stand-in prompt embedding


def tiny_attention_unet():
    """A pixel-space UNet2DModel: two levels, attention in the second, the middle block and the
    first up level (4 self-attention layers); the same weights at every call."""
    from diffusers import UNet2DModel

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return UNet2DModel(
            sample_size=FEWSHOT_SIZE, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=16,
        )


def tiny_text_conditioned_unet():
    """Stable Diffusion's UNet structure, tiny: 4 transformer blocks, each with attn1 (self) and
    attn2 (cross, to FEWSHOT_TEXT); the same weights at every call."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return UNet2DConditionModel(
            sample_size=FEWSHOT_SIZE, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32, attention_head_dim=4,
        )
