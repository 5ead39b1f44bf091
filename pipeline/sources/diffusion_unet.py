"""A pixel-space diffusion UNet as a feature source: noised images in, named module outputs out.

Taps are module paths of the diffusers UNet (`up_blocks.1.attentions.0`); a tap's feature map is
that module's forward output (its first tensor when it returns a tuple). guided-diffusion decoder
block numbers are aliases: `5` names the module `adm.blocks.decoder_block_names(unet)[5]`, so
`--blocks 5,6,7,8,12` works as the paper writes it, and the word `decoder` names every decoder
block (a superset for `select` to choose from).

Every image is noised with the same noise (`noise.shared_noise`) at each step, through the
paper's linear schedule (`noise.paper_scheduler`); the forward pass stops once every tap has
fired, so the decoder blocks after the last one never run.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from diffusers import SchedulerMixin

from pipeline.runtime.devices import autocast_for, pick_device
from pipeline.sizes import ImageShape, as_shape
from pipeline.sources.adm.blocks import decoder_block_names
from pipeline.sources.base import ALL_DECODER_BLOCKS, TapShape
from pipeline.sources.checkpoints import Backbone, load_backbone
from pipeline.sources.hooks import capture_outputs, run_until_captured
from pipeline.sources.noise import add_noise, paper_scheduler, shared_noise


def resolve_taps(unet: torch.nn.Module, blocks: Sequence[int | str]) -> list[str]:
    """Tap names for what a user typed: guided-diffusion block numbers, module paths, or
    `ALL_DECODER_BLOCKS` ("decoder") for every decoder block in order.

    Raises:
        ValueError: a number outside the UNet's decoder blocks, a name that is not one of its
            modules, or a tap given twice (the message lists what is valid).
    """
    numbered = decoder_block_names(unet)
    modules = dict(unet.named_modules())
    taps = []
    for block in blocks:
        if isinstance(block, int) and not isinstance(block, bool):
            if not 0 <= block < len(numbered):
                raise ValueError(
                    f"decoder block {block} is invalid: this UNet has {len(numbered)} decoder blocks, "
                    f"valid numbers are 0..{len(numbered) - 1}"
                )
            taps.append(numbered[block])
        elif isinstance(block, str) and block.isdigit():
            taps.extend(resolve_taps(unet, [int(block)]))
        elif block == ALL_DECODER_BLOCKS:
            taps.extend(numbered)
        elif isinstance(block, str) and block in modules and block:
            taps.append(block)
        else:
            raise ValueError(
                f"{block!r} is neither a decoder block number (0..{len(numbered) - 1}), {ALL_DECODER_BLOCKS!r} nor a "
                f"module of this UNet; decoder blocks are {numbered} (`inspect --taps` lists every module)"
            )
    repeated = sorted({tap for tap in taps if taps.count(tap) > 1})
    if repeated:
        raise ValueError(f"taps given more than once (block numbers are aliases of module names): {repeated}")
    return taps


def block_numbers(unet: torch.nn.Module) -> dict[str, int]:
    """Decoder module path → its guided-diffusion block number (none when the up blocks cannot be numbered)."""
    try:
        return {name: number for number, name in enumerate(decoder_block_names(unet))}
    except ValueError:
        return {}


def list_taps(unet: torch.nn.Module, forward: Callable[[], object]) -> list[dict]:
    """Every module of the UNet that can be a tap, with its feature map shape.

    `forward` runs the model once (e.g. `UNetSource.probe`), with a hook on every module; a
    module is listed when it runs once
    per pass (a module reused inside a pass, like a shared activation, has no single output) and
    its output (its first tensor for a tuple) is a (1, C, h, w) map. Decoder blocks carry their
    guided-diffusion number (`block`), None for the others.

    Returns:
        [{"name", "block", "channels", "height", "width"}] in the order the modules ran.
    """
    numbered = block_numbers(unet)
    modules = {name: module for name, module in unet.named_modules() if name}
    order: list[str] = []
    with torch.inference_mode(), capture_outputs(modules) as outputs:
        handles = [module.register_forward_hook(lambda *_, name=name: order.append(name)) for name, module in modules.items()]
        try:
            forward()
        finally:
            for handle in handles:
                handle.remove()
    taps = []
    calls = collections.Counter(order)
    for name in dict.fromkeys(order):  # in the order they first ran
        output = outputs[name]
        if calls[name] == 1 and isinstance(output, torch.Tensor) and output.dim() == 4:
            taps.append({"name": name, "block": numbered.get(name), "channels": output.shape[1],
                         "height": output.shape[2], "width": output.shape[3]})
    return taps


def tapped_outputs(
    unet: torch.nn.Module,
    taps: Sequence[str],
    inputs: torch.Tensor,
    steps: Sequence[int],
    noises: Sequence[torch.Tensor],
    scheduler: SchedulerMixin,
    **conditioning,
) -> dict[str, torch.Tensor]:
    """What every diffusion source computes: each tap's output for `inputs` noised at each step,
    averaged over the noise draws, the forward pass stopped once every tap has fired.

    Args:
        unet: the denoiser; called as `unet(x_t, t, **conditioning)`.
        taps: module paths, in feature order.
        inputs: x_0 (images or latents) on the UNet's device, (B, C, H, W).
        steps: the steps t, in feature order.
        noises: one noise tensor per draw, each (1, C, H, W), shared by the batch.
        scheduler: defines the noise schedule (`noise.add_noise`).

    Returns:
        tap → float32 (B, T, C_tap, h, w) on the inputs' device (the caller chooses what crosses
        to the host, and in which precision).
    """
    modules = {name: unet.get_submodule(name) for name in taps}
    per_step: dict[str, list[torch.Tensor]] = {name: [] for name in taps}
    with torch.inference_mode(), capture_outputs(modules, stop_when_all_captured=True) as outputs:
        for step in steps:
            timesteps = torch.full((len(inputs),), step, dtype=torch.long, device=inputs.device)
            sums: dict[str, torch.Tensor] = {}
            for noise in noises:
                outputs.clear()
                with autocast_for(inputs.device):
                    run_until_captured(unet, add_noise(inputs, step, noise, scheduler), timesteps, **conditioning)
                for name in taps:
                    value = outputs[name].float()
                    sums[name] = value if name not in sums else sums[name].add_(value)
            for name in taps:
                per_step[name].append(sums[name] / len(noises) if len(noises) > 1 else sums[name])
    return {name: torch.stack(maps, dim=1) for name, maps in per_step.items()}  # (B, T, C, h, w)


def draw_noises(seed: int, draws: int, shape: tuple[int, ...]) -> list[torch.Tensor]:
    """The shared noise of each draw k (seed + k), each of `shape`."""
    return [shared_noise(seed + draw, shape) for draw in range(draws)]


class UNetSource:
    """A diffusion UNet on its device, the taps to capture and the steps to noise to.

    Args:
        backbone: the loaded UNet and its provenance.
        blocks: guided-diffusion block numbers and/or module paths, in feature order.
        steps: the diffusion steps t, in feature order.
        noise_seed: seed of the noise shared by every image and step.
        device: where the UNet runs.
        noise_draws: features averaged over this many noise draws (draw k: seed + k).
    """

    def __init__(
        self, backbone: Backbone, blocks: Sequence[int | str], steps: Sequence[int], noise_seed: int,
        device: torch.device, noise_draws: int = 1,
    ):
        self.backbone = backbone
        self.unet = backbone.unet.to(device).eval()
        self.taps = resolve_taps(self.unet, blocks)
        self.steps = list(steps)
        self.noise_seed = noise_seed
        self.noise_draws = noise_draws
        self.device = device
        self.scheduler = paper_scheduler()
        self.size_multiple = 2 ** (len(self.unet.config.block_out_channels) - 1)  # one halving per level but the last

    def provenance(self) -> dict:
        return {
            "kind": self.backbone.source_format,
            "checkpoint_sha256": self.backbone.checkpoint_sha256,
            "architecture": self.backbone.architecture,
            "noise_seed": self.noise_seed,
            "noise_draws": self.noise_draws,
        }

    def tap_shapes(self, size: int | ImageShape) -> list[TapShape]:
        images = torch.zeros(1, self.unet.config.in_channels, *as_shape(size), device=self.device)  # (1, C, H, W)
        maps = tapped_outputs(self.unet, self.taps, images, [0], [torch.zeros_like(images, device="cpu")], self.scheduler)
        numbers = block_numbers(self.unet)
        return [TapShape(name, *maps[name].shape[2:], block=numbers.get(name)) for name in self.taps]

    def feature_maps(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        noises = draw_noises(self.noise_seed, self.noise_draws, (1, *images.shape[1:]))
        return tapped_outputs(self.unet, self.taps, images, self.steps, noises, self.scheduler)

    def probe(self, size: int) -> None:
        """One forward pass on zeros at size×size (what `list_taps` watches)."""
        images = torch.zeros(1, self.unet.config.in_channels, size, size, device=self.device)
        self.unet(images, torch.zeros(1, dtype=torch.long, device=self.device))


def load_unet_source(
    checkpoint: str | Path, blocks: Sequence[int | str], steps: Sequence[int], noise_seed: int, device: str,
    noise_draws: int = 1,
) -> UNetSource:
    """Loads a checkpoint onto the device ("auto" picks one) with its taps and steps."""
    return UNetSource(load_backbone(checkpoint), blocks, steps, noise_seed, pick_device(device), noise_draws)
