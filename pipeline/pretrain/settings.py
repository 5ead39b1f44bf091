"""What a DDPM pretraining run is asked to do (`PretrainSettings`) and what it did (`PretrainSummary`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from pipeline.sources.noise import NUM_TRAIN_STEPS

# Settings that do not change what is trained: a resumed run may change them (steps to extend it).
RESUMABLE_FIELDS = frozenset(
    {"steps", "checkpoint_every", "sample_every", "sample_count", "sample_inference_steps", "device", "precision"}
)
AUTOCAST_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}  # precision → autocast dtype
_GROUP_NORM_GROUPS = 32  # guided-diffusion's GroupNorm(32, C): every width must be a multiple


@dataclasses.dataclass(frozen=True)
class PretrainSettings:
    """How the DDPM is built and trained.

    Attributes:
        image_size: Images are resized to image_size × image_size (bicubic).
        block_out_channels: Channels of each resolution level, highest resolution first
            (guided-diffusion's model_channels × channel_mult); multiples of 32.
        layers_per_block: ResBlocks per encoder level; the decoder has one more per level, so 2
            gives guided-diffusion's numbering with 3 decoder blocks per level.
        attention_levels: Indices of the levels (0 = full resolution) whose blocks carry
            self-attention; the middle block always has it.
        head_channels: Channels per attention head.
        steps: Total optimiser steps (a resumed run continues up to this number).
        batch_size: Images per step, drawn uniformly with replacement.
        learning_rate: AdamW learning rate after the warm-up.
        warmup_steps: Linear learning-rate warm-up from 0.
        weight_decay: AdamW weight decay.
        gradient_clip: Largest gradient norm (0 disables clipping).
        ema_decay: Decay of the weight EMA (ramped up as min(decay, (1 + n) / (10 + n)) at step n).
        horizontal_flips: Flip half the images of each batch. Off by default: flips change the
            meaning of digits and text.
        seed: Seeds the initial weights and every random draw of training.
        checkpoint_every: Steps between checkpoints (state.pt, model/, loss.csv).
        sample_every: Steps between sample grids during training; 0 = only at the end.
        sample_count: Images in samples.png.
        sample_inference_steps: DDIM steps per sample (at most 1000, the training steps).
        device: "auto" (cuda > mps > cpu) or a torch device string.
        precision: "float32", or "bfloat16" to run the forward pass under bfloat16 autocast
            (weights, optimiser and loss stay float32): about 1.5-2× faster on CPUs with AMX or
            AVX-512 BF16 and on recent GPUs, but ~10× slower on CPUs without them (a warning
            says so). A resumed run may switch it.
    """

    image_size: int = 32
    block_out_channels: list[int] = dataclasses.field(default_factory=lambda: [32, 32, 64, 64, 64])
    layers_per_block: int = 2
    attention_levels: list[int] = dataclasses.field(default_factory=lambda: [3, 4])
    head_channels: int = 32
    steps: int = 5000
    batch_size: int = 32
    learning_rate: float = 2e-4
    warmup_steps: int = 100
    weight_decay: float = 0.0
    gradient_clip: float = 1.0
    ema_decay: float = 0.999
    horizontal_flips: bool = False
    seed: int = 0
    checkpoint_every: int = 500
    sample_every: int = 0
    sample_count: int = 64
    sample_inference_steps: int = 50
    device: str = "auto"
    precision: str = "float32"

    def __post_init__(self) -> None:
        if self.precision not in AUTOCAST_DTYPES:
            raise ValueError(f"pretrain: precision must be one of {sorted(AUTOCAST_DTYPES)}, got {self.precision!r}")
        levels = len(self.block_out_channels)
        if levels == 0 or any(c <= 0 or c % _GROUP_NORM_GROUPS for c in self.block_out_channels):
            raise ValueError(f"pretrain: block_out_channels must be multiples of 32, got {self.block_out_channels}")
        if self.image_size <= 0 or self.image_size % 2 ** (levels - 1):
            raise ValueError(
                f"pretrain: image_size {self.image_size} must be divisible by 2^{levels - 1} for {levels} levels"
            )
        if any(not 0 <= level < levels for level in self.attention_levels):
            raise ValueError(f"pretrain: attention_levels {self.attention_levels} must lie in 0..{levels - 1}")
        positive = ("layers_per_block", "head_channels", "steps", "batch_size", "checkpoint_every",
                    "sample_count", "sample_inference_steps")
        bad = {name: getattr(self, name) for name in positive if getattr(self, name) <= 0}
        if bad:
            raise ValueError(f"pretrain: these settings must be positive: {bad}")
        if self.sample_inference_steps > NUM_TRAIN_STEPS:
            raise ValueError(f"pretrain: sample_inference_steps {self.sample_inference_steps} exceeds the "
                             f"{NUM_TRAIN_STEPS} training steps")
        if not 0.0 <= self.ema_decay < 1.0 or self.learning_rate <= 0.0:
            raise ValueError(f"pretrain: need 0 <= ema_decay < 1 and learning_rate > 0, got "
                             f"{self.ema_decay}, {self.learning_rate}")
        if min(self.warmup_steps, self.sample_every, self.weight_decay, self.gradient_clip) < 0:
            raise ValueError("pretrain: warmup_steps, sample_every, weight_decay, gradient_clip must be >= 0")


@dataclasses.dataclass(frozen=True)
class PretrainSummary:
    """What a `pretrain_ddpm` call did.

    Attributes:
        out_dir: The run folder.
        model_dir: The EMA model (diffusers folder).
        steps_done: Optimiser steps the model has had in all (== settings.steps).
        resumed_from: The checkpoint step this call started from (0 for a fresh run).
        images: Training images.
        parameters: Parameters of the UNet.
        final_loss: Smoothed training loss at the last step.
        seconds: Wall time of this call.
        device: Where it trained.
    """

    out_dir: Path
    model_dir: Path
    steps_done: int
    resumed_from: int
    images: int
    parameters: int
    final_loss: float
    seconds: float
    device: str
