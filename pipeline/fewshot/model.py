"""DiffewS's model: a diffusion UNet fine-tuned to predict a query's mask from supports in one step.

`FewShotUNet` wraps a diffusers UNet, a pixel-space `UNet2DModel` or a latent
`UNet2DConditionModel`, and adds one module: `conv_in_ref`, the input stem of the supports,
which read image ⊕ mask map on channels (2·C). A forward pass is two passes of the same UNet at
timestep 1 with no noise:

1. each support, through `conv_in_ref` and the rest of the UNet, its self-attention keys and
   values recorded (`kv_fusion`); its output is discarded;
2. the query, through the UNet's own `conv_in`, each self-attention layer attending to its own
   tokens and its supports' (KV fusion). Its output is the predicted mask map, trained with MSE
   against the query's mask map (`training_loss`). Gradients reach the support path.

A `UNet2DConditionModel` also takes `encoder_hidden_states`, the empty prompt's embedding (the
paper: no text, no guidance), given to both passes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from pipeline.fewshot.kv_fusion import FusionMode, KeyValueBank, key_value_fusion

TIMESTEP = 1
ATTENTION_HEAD_CHANNELS = 32  # channels per head of the added attention layers
TRAINABLE_PARTS = ("all", "attention")


class ResnetThenAttention(torch.nn.Module):
    """A UNet block's resnet followed by a self-attention layer (residual), called as the resnet is."""

    def __init__(self, resnet: torch.nn.Module, attention: Attention):
        super().__init__()
        self.resnet, self.attention = resnet, attention

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        return self.attention(self.resnet(hidden_states, temb, *args, **kwargs))


def add_fine_attention(unet: torch.nn.Module, resolutions: Sequence[int], sample_size: int) -> list[str]:
    """Adds a self-attention layer after every resnet of the down and up blocks of a pixel-space
    `UNet2DModel` that work at one of `resolutions` (their input side, in model-input pixels at
    `sample_size`). Each is zero-initialised at its output, so the UNet computes what it did; KV
    fusion then reaches these finer token grids too. A UNet that attends only at coarse levels
    (the demo's at 4×4 and 2×2 of 32×32: 8-pixel cells) cannot otherwise tell small parts apart.

    Returns:
        The module paths of the new attention layers.

    Raises:
        ValueError: not a UNet2DModel, or a resolution no block works at.
    """
    if isinstance(unet, UNet2DConditionModel) or not hasattr(unet, "down_blocks"):
        raise ValueError("fine_attention is for pixel-space UNet2DModel backbones (Stable Diffusion attends at every level)")
    added, found = [], set()
    blocks = [(f"down_blocks.{i}", block, sample_size // 2**i) for i, block in enumerate(unet.down_blocks)]
    levels = len(unet.down_blocks)
    blocks += [(f"up_blocks.{i}", block, sample_size // 2 ** (levels - 1 - i)) for i, block in enumerate(unet.up_blocks)]
    for path, block, side in blocks:
        if side not in resolutions:
            continue
        found.add(side)
        if getattr(block, "attentions", None):  # it attends already
            continue
        for index, resnet in enumerate(block.resnets):
            channels = resnet.out_channels
            attention = Attention(
                channels, heads=max(1, channels // ATTENTION_HEAD_CHANNELS), dim_head=ATTENTION_HEAD_CHANNELS,
                norm_num_groups=min(32, channels), residual_connection=True, bias=True, upcast_softmax=True,
                _from_deprecated_attn_block=True, eps=1e-5,
            )
            torch.nn.init.zeros_(attention.to_out[0].weight)
            torch.nn.init.zeros_(attention.to_out[0].bias)
            block.resnets[index] = ResnetThenAttention(resnet, attention)
            added.append(f"{path}.resnets.{index}.attention")
    missing = sorted(set(resolutions) - found)
    if missing:
        raise ValueError(f"no block of this UNet works at {missing} (its levels: {sorted({side for _, _, side in blocks})})")
    return added


def freeze_except(model: torch.nn.Module, trainable: str) -> None:
    """"all": every weight trains (the paper). "attention": only the self-attention layers, the
    support stem and the output head (`conv_norm_out`, `conv_out`) train; the pretrained
    convolutions stay as they are, the way few-shot segmenters keep a frozen backbone so that its
    features still describe classes it was never fine-tuned on."""
    if trainable not in TRAINABLE_PARTS:
        raise ValueError(f"trainable must be one of {TRAINABLE_PARTS}, got {trainable!r}")
    if trainable == "all":
        model.requires_grad_(True)
        return
    model.requires_grad_(False)
    for name, module in model.named_modules():
        if isinstance(module, Attention) or name.endswith(("conv_in_ref", "conv_norm_out", "conv_out")):
            module.requires_grad_(True)


def support_stem(conv_in: torch.nn.Conv2d) -> torch.nn.Conv2d:
    """A copy of `conv_in` that reads twice the channels (image ⊕ mask map), initialised so that
    stem(x ⊕ x) == conv_in(x): the weights repeated on the input axis and halved, the bias copied.

    Args:
        conv_in: the UNet's input convolution, C → C_model.

    Returns:
        A new `Conv2d`, 2·C → C_model, on the same device and dtype.
    """
    if conv_in.groups != 1:
        raise ValueError(f"conv_in with groups={conv_in.groups} is not supported (expected an ordinary convolution)")
    stem = torch.nn.Conv2d(
        2 * conv_in.in_channels, conv_in.out_channels, kernel_size=conv_in.kernel_size, stride=conv_in.stride,
        padding=conv_in.padding, dilation=conv_in.dilation, bias=conv_in.bias is not None,
        padding_mode=conv_in.padding_mode, device=conv_in.weight.device, dtype=conv_in.weight.dtype,
    )
    with torch.no_grad():
        stem.weight.copy_(torch.cat([conv_in.weight, conv_in.weight], dim=1) / 2)  # (C_model, 2C, k, k)
        if conv_in.bias is not None:
            stem.bias.copy_(conv_in.bias)
    return stem


@contextlib.contextmanager
def swapped_input_stem(unet: torch.nn.Module, stem: torch.nn.Module) -> Iterator[None]:
    """`unet.conv_in` is `stem` inside the block, the original again on exit (even on error)."""
    original = unet.conv_in
    unet.conv_in = stem
    try:
        yield
    finally:
        unet.conv_in = original


class FewShotUNet(torch.nn.Module):
    """A diffusers UNet and its support stem, as one trainable module (see the module docstring).

    Args:
        unet: a `UNet2DModel` (pixel space) or `UNet2DConditionModel` (latent space) with
            self-attention; its in_channels is C, the channels of images and mask maps.
        max_support_tokens: fuse at most this many support tokens per layer and query, a random
            subset (`KeyValueBank`); None fuses all N·L.
        timestep: the one timestep of both passes.
    """

    def __init__(self, unet: torch.nn.Module, max_support_tokens: int | None = None, timestep: int = TIMESTEP):
        super().__init__()
        self.unet = unet
        self.conv_in_ref = support_stem(unet.conv_in)
        self.max_support_tokens = max_support_tokens
        self.timestep = timestep
        self.needs_text = isinstance(unet, UNet2DConditionModel)

    def forward(
        self,
        query: torch.Tensor,
        support_images: torch.Tensor,
        support_masks: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The query's predicted mask map.

        Args:
            query: (B, C, H, W) images (or their latents).
            support_images: (B, N, C, H, W), N supports per query, same space as `query`.
            support_masks: (B, N, C, H, W) mask maps (`masks.masks_to_maps`, or their latents).
            encoder_hidden_states: a `UNet2DConditionModel`'s text conditioning, (1, L, D) or
                (B, L, D); None for a `UNet2DModel`.
            generator: a CPU generator for the subset of support tokens (`max_support_tokens`).

        Returns:
            (B, C_out, H, W), the predicted mask map.
        """
        self._check_inputs(query, support_images, support_masks, encoder_hidden_states)
        bank = self.support_bank(support_images, support_masks, encoder_hidden_states, generator)
        return self.segment(query, bank, encoder_hidden_states)

    def support_bank(
        self,
        support_images: torch.Tensor,
        support_masks: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> KeyValueBank:
        """The support pass alone: every self-attention layer's keys and values of the supports
        (B, N, C, H, W) with their mask maps, kept (with their autograd history) for `segment`.
        A bank of one query's supports (B = 1) serves any number of queries in turn, so a
        support set is encoded once (`bench.demo_fewshot` times it)."""
        batch, shots = support_images.shape[:2]
        supports = torch.cat([support_images, support_masks], dim=2).flatten(0, 1)  # (B·N, 2C, H, W), query-major
        support_text = None
        if encoder_hidden_states is not None:
            support_text = encoder_hidden_states.expand(batch, -1, -1).repeat_interleave(shots, dim=0)  # (B·N, L, D)
        bank = KeyValueBank(self.max_support_tokens, generator)
        with key_value_fusion(self.unet, bank):
            bank.mode = FusionMode.RECORD
            with swapped_input_stem(self.unet, self.conv_in_ref):
                self._denoise(supports, support_text)  # only the recorded keys and values are used
        return bank

    def segment(self, query: torch.Tensor, bank: KeyValueBank, encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        """The query pass: (B, C, H, W) → the predicted mask map, attending to `bank`'s supports
        (B queries for a bank of B support sets)."""
        query_text = None if encoder_hidden_states is None else encoder_hidden_states.expand(len(query), -1, -1)
        with key_value_fusion(self.unet, bank):
            bank.mode = FusionMode.FUSE
            return self._denoise(query, query_text)

    def _denoise(self, sample: torch.Tensor, text: torch.Tensor | None) -> torch.Tensor:
        timesteps = torch.full((len(sample),), self.timestep, dtype=torch.long, device=sample.device)
        conditioning = {} if text is None else {"encoder_hidden_states": text}
        return self.unet(sample, timesteps, **conditioning).sample

    def _check_inputs(
        self, query: torch.Tensor, support_images: torch.Tensor, support_masks: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
    ) -> None:
        """Raises ValueError naming the shapes when the inputs do not fit the UNet or each other."""
        channels = self.unet.config.in_channels
        if query.ndim != 4 or query.shape[1] != channels:
            raise ValueError(f"query must be (B, {channels}, H, W) for this UNet, got {tuple(query.shape)}")
        expected = (query.shape[0], support_images.shape[1] if support_images.ndim == 5 else "N", *query.shape[1:])
        if support_images.ndim != 5 or support_images.shape[0] != query.shape[0] or support_images.shape[2:] != query.shape[1:]:
            raise ValueError(f"support_images must be {expected}, got {tuple(support_images.shape)}")
        if support_masks.shape != support_images.shape:
            raise ValueError(f"support_masks must be shaped like support_images {expected}, got {tuple(support_masks.shape)}")
        if self.needs_text and encoder_hidden_states is None:
            raise ValueError("a UNet2DConditionModel needs encoder_hidden_states (the empty prompt's embedding)")
        if not self.needs_text and encoder_hidden_states is not None:
            raise ValueError(f"{type(self.unet).__name__} takes no encoder_hidden_states")
        if encoder_hidden_states is not None and encoder_hidden_states.shape[0] not in (1, query.shape[0]):
            raise ValueError(
                f"encoder_hidden_states must be (1, L, D) or ({query.shape[0]}, L, D), got {tuple(encoder_hidden_states.shape)}"
            )


def training_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error between predicted and target mask maps, both (B, C, H, W) (latents
    for a latent UNet: the paper has no pixel loss)."""
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    return F.mse_loss(prediction, target.to(prediction.dtype))
