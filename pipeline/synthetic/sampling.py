"""Sampling new images from the diffusion model a feature source holds, with diffusers' schedulers.

The schedule is the checkpoint's own: the scheduler configuration the source noises with (the
paper's linear β schedule for guided-diffusion and pixel-space diffusers UNets, the folder's
`scheduler/` for latent diffusion). Two samplers:

- "ddpm": ancestral sampling (`DDPMScheduler`), the official DatasetDDPM's; with fewer sampling
  steps than training steps it strides over the schedule as diffusers does.
- "ddim": deterministic DDIM (η = 0), far fewer steps for the same quality on small models.

Every sample draws its noise from its own generator, seeded by (seed, sample index): a sample is
the same whichever batch it is made in (up to float rounding of batched kernels), so a stopped
run resumes with the same dataset.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, SchedulerMixin

from pipeline.config import SamplerName
from pipeline.runtime.devices import autocast_for
from pipeline.sizes import as_shape
from pipeline.sources.diffusion_unet import UNetSource
from pipeline.sources.latent import LatentSource

SAMPLERS = ("ddpm", "ddim")


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index`'s generator: independent streams for every (seed, index)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def make_scheduler(sampler: SamplerName, training_config: dict, learned_variance: bool, clip: bool = True) -> SchedulerMixin:
    """A sampling scheduler over the training schedule `training_config` (a scheduler's config).

    Args:
        sampler: "ddpm" (ancestral) or "ddim" (η = 0).
        training_config: the configuration of the scheduler the model was trained with.
        learned_variance: the model predicts ε and a variance interpolation (guided-diffusion's
            learn_sigma: twice the input channels out); the DDPM sampler then uses that variance.
        clip: clip each step's x̂_0 to [-1, 1] (pixel space, as the official sampler; latents are
            not bounded, so latent diffusion does not clip).

    Raises:
        ValueError: for an unknown sampler.
    """
    shared = {"clip_sample": clip, "clip_sample_range": 1.0, "prediction_type": training_config.get("prediction_type", "epsilon")}
    if sampler == "ddpm":
        variance = "learned_range" if learned_variance else "fixed_small"
        return DDPMScheduler.from_config(training_config, variance_type=variance, **shared)
    if sampler == "ddim":
        return DDIMScheduler.from_config(
            training_config, set_alpha_to_one=True, steps_offset=0, timestep_spacing="trailing", **shared
        )
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")


@dataclasses.dataclass
class SampleSpace:
    """Where a source's model samples: its denoiser, the shape of one sample, and how a finished
    sample becomes an image in [-1, 1] (the identity in pixel space, the VAE's decoder for latents)."""

    unet: torch.nn.Module
    sample_shape: tuple[int, int, int]  # (C, h, w) of one sample
    training_config: dict
    device: torch.device
    conditioning: torch.Tensor | None = None  # (1, L, D) prompt embeddings for latent diffusion
    vae: torch.nn.Module | None = None
    vae_scaling: float = 1.0

    @property
    def learned_variance(self) -> bool:
        return self.unet.config.out_channels == 2 * self.sample_shape[0]

    def model_output(self, samples: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """The denoiser's output for x_t (B, C, h, w) at step t: (B, C or 2C, h, w)."""
        timesteps = step.expand(len(samples)).to(self.device)
        if self.conditioning is None:
            return self.unet(samples, timesteps).sample
        return self.unet(samples, timesteps, encoder_hidden_states=self.conditioning.expand(len(samples), -1, -1)).sample

    def to_images(self, samples: torch.Tensor) -> torch.Tensor:
        """Finished samples → images (B, 3, H, W) in [-1, 1]."""
        if self.vae is None:
            return samples.clamp(-1.0, 1.0)
        return self.vae.decode(samples / self.vae_scaling).sample.float().clamp(-1.0, 1.0)


def sample_space_of(source: UNetSource | LatentSource, image_size: int | list[int]) -> SampleSpace:
    """The sample space of a diffusion feature source, for images of `image_size` (S or [H, W]).

    Raises:
        ValueError: the size is not a multiple of the model's downsampling.
    """
    height, width = as_shape(image_size)
    if height % source.size_multiple or width % source.size_multiple:
        raise ValueError(f"cannot sample {height}×{width} images: both sides must be multiples of {source.size_multiple}")
    if isinstance(source, LatentSource):
        factor = 2 ** (len(source.vae.config.block_out_channels) - 1)
        return SampleSpace(
            unet=source.unet, sample_shape=(source.unet.config.in_channels, height // factor, width // factor),
            training_config=dict(source.model.scheduler.config), device=source.device,
            conditioning=source.model.prompt_embeds.to(source.device), vae=source.vae,
            vae_scaling=source.vae.config.scaling_factor,
        )
    return SampleSpace(
        unet=source.unet, sample_shape=(source.unet.config.in_channels, height, width),
        training_config=dict(source.scheduler.config), device=source.device,
    )


@torch.inference_mode()
def sample_images(
    space: SampleSpace, sampler: SamplerName, sampling_steps: int, generators: list[torch.Generator]
) -> torch.Tensor:
    """One batch of new images, one per generator (CPU generators: the same samples on every device).

    Args:
        space: the model and the shape of a sample.
        sampler: "ddpm" or "ddim".
        sampling_steps: denoising steps, at most the schedule's training steps.
        generators: one seeded CPU generator per sample.

    Returns:
        float32 (B, 3, H, W) in [-1, 1] on the space's device.
    """
    scheduler = make_scheduler(sampler, space.training_config, space.learned_variance, clip=space.vae is None)
    training_steps = scheduler.config.num_train_timesteps
    if not 1 <= sampling_steps <= training_steps:
        raise ValueError(f"sampling steps must be within 1..{training_steps} (the schedule's steps), got {sampling_steps}")
    scheduler.set_timesteps(sampling_steps)
    channels = space.sample_shape[0]
    samples = torch.stack([torch.randn(space.sample_shape, generator=generator) for generator in generators])
    samples = samples.to(space.device)  # (B, C, h, w): x_T
    for step in scheduler.timesteps:
        with autocast_for(space.device):
            output = space.model_output(samples, step).float()  # (B, C or 2C, h, w)
        if sampler == "ddim":
            samples = scheduler.step(output[:, :channels], step, samples, eta=0.0, use_clipped_model_output=True).prev_sample
        else:
            samples = scheduler.step(output, step, samples, generator=generators).prev_sample
    with autocast_for(space.device):
        return space.to_images(samples)
