"""Which feature source a checkpoint is: a latent-diffusion folder or a pixel-space UNet."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import ExtractSettings
from pipeline.runtime.devices import pick_device
from pipeline.sources.base import FeatureSource
from pipeline.sources.diffusion_unet import UNetSource, load_unet_source
from pipeline.sources.latent import (
    LATENT_DIFFUSION,
    LatentSource,
    is_latent_diffusion_folder,
    load_latent_diffusion,
    load_latent_source,
)


def load_source(checkpoint: str | Path, settings: ExtractSettings) -> FeatureSource:
    """The extraction's source for a checkpoint, with the settings' taps, steps, seed and draws.

    Raises:
        ValueError: a prompt given for a model without text conditioning, or what loading raises.
    """
    if is_latent_diffusion_folder(checkpoint):
        return load_latent_source(
            checkpoint, settings.blocks, settings.steps, settings.seed, settings.device, settings.noise_draws,
            settings.prompt, settings.prompt_embeds,
        )
    if settings.prompt or settings.prompt_embeds:
        raise ValueError(
            f"{checkpoint} is a pixel-space UNet without text conditioning: --prompt and --prompt-embeds apply "
            "to latent-diffusion folders (unet/ with cross-attention, vae/, scheduler/) only"
        )
    return load_unet_source(checkpoint, settings.blocks, settings.steps, settings.seed, settings.device,
                            settings.noise_draws)


def load_source_for(
    checkpoint: str | Path, provenance: dict, steps: list[int], taps: list[str], device: str,
    prompt_embeds: str | Path | None = None,
) -> FeatureSource:
    """The source that makes the features a head was trained on (`predict`): same taps, steps,
    seed and draws, and for latent diffusion the same prompt (re-encoded, or the same file).

    The head's record comes in as plain values (`FeatureDescription.source/steps/taps`), not as
    the store's description type, so that sources never depend on the store above them.

    Args:
        checkpoint: the model file or folder.
        provenance: the recorded `FeatureSource.provenance()` of the features.
        steps: their diffusion steps, in feature order.
        taps: their tap names, in feature order.
        device: "auto", "cpu", "cuda"….
        prompt_embeds: the prompt-embeddings file the features were made with, if any.

    Raises:
        ValueError: the features are not a diffusion model's, or the prompt embeddings differ.
    """
    if "noise_seed" not in provenance:
        raise ValueError(f"the features came from a {provenance.get('kind')} source, not a diffusion model's checkpoint")
    if provenance["kind"] != LATENT_DIFFUSION:
        return load_unet_source(checkpoint, taps, steps, provenance["noise_seed"], device,
                                provenance.get("noise_draws", 1))
    source = load_latent_source(
        checkpoint, taps, steps, provenance["noise_seed"], device, provenance["noise_draws"],
        provenance["prompt"] or "", prompt_embeds,
    )
    if source.provenance()["prompt_embeds_sha256"] != provenance["prompt_embeds_sha256"]:
        raise ValueError(
            "the prompt embeddings differ from those the features were made with"
            + (f" (prompt {provenance['prompt']!r})" if provenance["prompt"] is not None else "; give the same --prompt-embeds file")
        )
    return source


def probe_source(checkpoint: str | Path, size: int | None = None) -> tuple[UNetSource | LatentSource, int]:
    """A checkpoint's source with no taps, for looking at its modules (`inspect --taps`), and the
    input size to look at (default: what the model was trained at)."""
    if is_latent_diffusion_folder(checkpoint):
        model = load_latent_diffusion(checkpoint, require_prompt=False)
        source = LatentSource(model, [], [0], 0, pick_device("cpu"))
        downsampling = 2 ** (len(model.vae.config.block_out_channels) - 1)
        return source, size or model.unet.config.sample_size * downsampling
    source = load_unet_source(checkpoint, [], [0], 0, "cpu")
    return source, size or source.unet.config.sample_size


def native_image_size(source: FeatureSource) -> int:
    """The image side a source's model was trained at: its UNet's sample size, times the VAE's
    downsampling factor for a latent-diffusion source."""
    side = source.unet.config.sample_size
    side = side if isinstance(side, int) else side[0]
    if hasattr(source, "vae"):
        side *= 2 ** (len(source.vae.config.block_out_channels) - 1)
    return side
