"""A latent-diffusion UNet (the Stable Diffusion family) as a feature source.

Loaded from a local diffusers folder with `unet/` (a `UNet2DConditionModel`), `vae/` (an
`AutoencoderKL`) and `scheduler/`; `text_encoder/` + `tokenizer/` are needed only to encode a
text prompt. The contract, per batch of images x in [-1, 1] at the store's size:

- latents z = `vae.encode(x).latent_dist.mean` × `vae.config.scaling_factor` (the mean: deterministic);
- noise: draw k of `noise_draws` is `randn((1, C_latent, h, w))` from seed `noise_seed + k` on the
  CPU, the same for every image; the features are the mean over the draws (DIFT averages 8);
- z_t from the folder's own scheduler configuration (`noise.add_noise`), so v-prediction models
  (SD 2.x) keep their schedule;
- the UNet runs on z_t at t with `encoder_hidden_states` = the prompt's embeddings (one prompt,
  encoded once, expanded to the batch), and each tap is a module's forward output.

SD-XL's UNet also needs pooled text embeddings and time ids; it is refused with a message until
that conditioning is supported.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from pipeline.runtime.devices import autocast_for, pick_device
from pipeline.runtime.hashing import file_sha256
from pipeline.sizes import ImageShape, as_shape
from pipeline.sources.base import TapShape
from pipeline.sources.checkpoints import diffusers_weights_file, plain_config
from pipeline.sources.diffusion_unet import block_numbers, draw_noises, resolve_taps, tapped_outputs

LATENT_DIFFUSION = "latent-diffusion"
_PARTS = ("unet", "vae", "scheduler")


def is_latent_diffusion_folder(path: str | Path) -> bool:
    """Whether `path` is a diffusers pipeline folder whose `unet/` is a text-conditioned UNet."""
    config = Path(path) / "unet" / "config.json"
    if not config.is_file():
        return False
    try:
        document = json.loads(config.read_text())
    except json.JSONDecodeError:
        return False
    return document.get("_class_name") == "UNet2DConditionModel" or "cross_attention_dim" in document


@dataclasses.dataclass(frozen=True)
class LatentDiffusion:
    """The loaded parts of a latent-diffusion folder and where they came from.

    Attributes:
        unet, vae: in eval mode, float32, on the CPU.
        scheduler: the folder's noise schedule (as a `DDPMScheduler`).
        prompt_embeds: float32 (1, L, D), D = the UNet's cross-attention width.
        prompt: the text that was encoded, or None when the embeddings came from a file.
        checkpoint_sha256: one digest of the UNet's and the VAE's weight files.
        architecture: the UNet's, VAE's and scheduler's configurations.
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler: DDPMScheduler
    prompt_embeds: torch.Tensor
    prompt: str | None
    checkpoint_sha256: str
    architecture: dict


def load_latent_diffusion(
    folder: str | Path, prompt: str = "", prompt_embeds: str | Path | None = None, require_prompt: bool = True
) -> LatentDiffusion:
    """Loads a latent-diffusion folder.

    Args:
        folder: a diffusers pipeline folder (unet/, vae/, scheduler/, optionally text_encoder/ and tokenizer/).
        prompt: the text to encode with the folder's text encoder (ignored with `prompt_embeds`).
        prompt_embeds: a `.safetensors` or `.npy` file holding one (1, L, D) tensor.
        require_prompt: False for a folder without a text encoder and no `prompt_embeds`: the
            embeddings are zeros (1, 1, D), enough to look at shapes, not to extract.

    Raises:
        ValueError: a part is missing or unreadable, SD-XL conditioning, or embeddings whose width
            does not fit the UNet (the message names the folder or file and the part).
    """
    folder = Path(folder)
    missing = [part for part in _PARTS if not (folder / part).is_dir()]
    if missing:
        raise ValueError(
            f"{folder} is missing {', '.join(part + '/' for part in missing)}: a latent-diffusion folder needs "
            "unet/, vae/ and scheduler/ (a diffusers pipeline folder, e.g. saved with `save_pretrained`)"
        )
    added = json.loads((folder / "unet" / "config.json").read_text()).get("addition_embed_type")
    if added is not None:  # checked before the weights are read
        raise ValueError(
            f"{folder}/unet needs added conditioning ({added!r}: SD-XL's pooled text embeddings and time ids), "
            "which segcache does not supply yet; use an SD 1.x/2.x-style folder"
        )
    unet = _load_part(UNet2DConditionModel, folder, "unet")
    vae = _load_part(AutoencoderKL, folder, "vae")
    scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(folder / "scheduler"))
    width = unet.config.cross_attention_dim
    if prompt_embeds is not None:
        embeds, prompt = _read_prompt_embeds(Path(prompt_embeds)), None
        source = str(prompt_embeds)
    elif (folder / "text_encoder").is_dir():
        embeds, source = _encode_prompt(folder, prompt), f"{folder}/text_encoder"
    elif require_prompt:
        raise ValueError(f"{folder} has no text_encoder/: give --prompt-embeds FILE, a (1, L, {width}) tensor")
    else:
        embeds, prompt, source = torch.zeros(1, 1, width), None, "zeros"
    if embeds.shape[-1] != width:
        raise ValueError(
            f"{source} gives prompt embeddings of width {embeds.shape[-1]}, but {folder}/unet's cross-attention "
            f"takes {width}: the text encoder (or file) does not belong to this UNet"
        )
    digests = {part: file_sha256(diffusers_weights_file(folder / part)) for part in ("unet", "vae")}
    return LatentDiffusion(
        unet=unet.eval(),
        vae=vae.eval(),
        scheduler=scheduler,
        prompt_embeds=embeds.float(),
        prompt=prompt,
        checkpoint_sha256=hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest(),
        architecture={part: plain_config(model.config) for part, model in (("unet", unet), ("vae", vae), ("scheduler", scheduler))},
    )


class LatentSource:
    """A latent-diffusion model as a feature source (see the module docstring for the contract).

    Args:
        model: the loaded parts.
        blocks: module paths of the UNet (or decoder block numbers), in feature order.
        steps: the steps t, in feature order.
        noise_seed: the seed of noise draw 0.
        device: where the VAE and UNet run.
        noise_draws: features averaged over this many draws.
    """

    def __init__(
        self, model: LatentDiffusion, blocks: Sequence[int | str], steps: Sequence[int], noise_seed: int,
        device: torch.device, noise_draws: int = 1,
    ):
        self.model = model
        self.unet = model.unet.to(device)
        self.vae = model.vae.to(device)
        self.vae.enable_slicing()  # encodes a batch one image at a time: memory stays flat
        self.taps = resolve_taps(self.unet, blocks)
        self.steps = list(steps)
        self.noise_seed = noise_seed
        self.noise_draws = noise_draws
        self.device = device
        # The VAE's downsampling, then the UNet's on the latents (one halving per level but the last).
        self.size_multiple = 2 ** (len(self.vae.config.block_out_channels) - 1) * 2 ** (
            len(self.unet.config.block_out_channels) - 1)

    def provenance(self) -> dict:
        embeds = self.model.prompt_embeds.contiguous().numpy()
        return {
            "kind": LATENT_DIFFUSION,
            "checkpoint_sha256": self.model.checkpoint_sha256,
            "architecture": self.model.architecture,
            "noise_seed": self.noise_seed,
            "noise_draws": self.noise_draws,
            "prompt": self.model.prompt,
            "prompt_embeds_sha256": hashlib.sha256(embeds.tobytes()).hexdigest(),
        }

    def tap_shapes(self, size: int | ImageShape) -> list[TapShape]:
        latents = self.encode(torch.zeros(1, 3, *as_shape(size), device=self.device))  # (1, C_latent, H/f, W/f)
        maps = tapped_outputs(
            self.unet, self.taps, latents, [0], [torch.zeros_like(latents, device="cpu")], self.model.scheduler,
            encoder_hidden_states=self._prompt(1),
        )
        numbers = block_numbers(self.unet)
        return [TapShape(name, *maps[name].shape[2:], block=numbers.get(name)) for name in self.taps]

    def feature_maps(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        latents = self.encode(images)  # (B, C_latent, h, w)
        noises = draw_noises(self.noise_seed, self.noise_draws, (1, *latents.shape[1:]))
        return tapped_outputs(
            self.unet, self.taps, latents, self.steps, noises, self.model.scheduler,
            encoder_hidden_states=self._prompt(len(images)),
        )

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) in [-1, 1] → latents (B, C, S/f, S/f), the posterior mean, scaled."""
        with torch.inference_mode(), autocast_for(images.device):
            latents = self.vae.encode(images).latent_dist.mean
        return latents.float() * self.vae.config.scaling_factor

    def probe(self, size: int) -> None:
        """One forward pass on the latents of a zero image (what `list_taps` watches)."""
        latents = self.encode(torch.zeros(1, 3, size, size, device=self.device))
        self.unet(latents, torch.zeros(1, dtype=torch.long, device=self.device), encoder_hidden_states=self._prompt(1))

    def _prompt(self, batch: int) -> torch.Tensor:
        return self.model.prompt_embeds.to(self.device).expand(batch, -1, -1)


def load_latent_source(
    folder: str | Path, blocks: Sequence[int | str], steps: Sequence[int], noise_seed: int, device: str,
    noise_draws: int = 1, prompt: str = "", prompt_embeds: str | Path | None = None,
) -> LatentSource:
    """Loads a latent-diffusion folder onto the device ("auto" picks one) with its taps and steps."""
    model = load_latent_diffusion(folder, prompt, prompt_embeds)
    return LatentSource(model, blocks, steps, noise_seed, pick_device(device), noise_draws)


def _load_part(model_class, folder: Path, part: str):
    try:
        return model_class.from_pretrained(folder / part, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, TypeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{folder}/{part} is not a readable {model_class.__name__}: {first_line}") from None


def _read_prompt_embeds(path: Path) -> torch.Tensor:
    """One (1, L, D) tensor from a `.safetensors` file (its only tensor, or `prompt_embeds`) or `.npy`."""
    if not path.is_file():
        raise ValueError(f"prompt embeddings file not found: {path}")
    if path.suffix == ".npy":
        tensor = torch.from_numpy(np.load(path, allow_pickle=False))
    elif path.suffix == ".safetensors":
        tensors = safetensors.torch.load_file(path)
        if len(tensors) != 1 and "prompt_embeds" not in tensors:
            raise ValueError(f"{path} holds {sorted(tensors)}: expected one tensor, or one named prompt_embeds")
        tensor = tensors.get("prompt_embeds", next(iter(tensors.values())))
    else:
        raise ValueError(f"{path}: prompt embeddings must be a .safetensors or .npy file")
    if tensor.dim() == 2:
        tensor = tensor[None]
    if tensor.dim() != 3 or tensor.shape[0] != 1:
        raise ValueError(f"{path} holds a tensor of shape {tuple(tensor.shape)}; expected (1, L, D)")
    return tensor.float()


def _encode_prompt(folder: Path, prompt: str) -> torch.Tensor:
    """The prompt through the folder's tokenizer and text encoder, padded to the tokenizer's
    length as diffusers' Stable Diffusion pipeline does (no attention mask): float32 (1, L, D)."""
    try:
        from transformers import AutoTokenizer, CLIPTextModel
    except ImportError:
        raise ValueError(
            f"encoding a prompt with {folder}/text_encoder needs the `transformers` package "
            "(pip install transformers), or give --prompt-embeds FILE"
        ) from None
    if not (folder / "tokenizer").is_dir():
        raise ValueError(
            f"{folder} has text_encoder/ but no tokenizer/: encoding a prompt needs both, or give --prompt-embeds FILE"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"{folder}/tokenizer is not a readable tokenizer: {str(error).strip()[:200]}") from None
    try:
        # float32 whatever the stored dtype: transformers 5 would keep an fp16 checkpoint in fp16.
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch.float32).eval()
    except (OSError, ValueError, RuntimeError, TypeError) as error:
        raise ValueError(f"{folder}/text_encoder is not a readable CLIPTextModel: {str(error).strip()[:200]}") from None
    tokens = tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    with torch.inference_mode():
        return text_encoder(tokens.input_ids)[0].float()  # (1, model_max_length, hidden_size)
