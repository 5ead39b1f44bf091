"""guided-diffusion's decoder block numbers and the diffusers modules they name.

Decoder blocks are numbered as guided-diffusion numbers its `output_blocks`: 0 is the first block
at the lowest resolution, and there are `layers_per_block + 1` blocks per resolution level. For
block `b`, `decoder_block(unet, b)` is the diffusers module whose output equals the output of
ADM's `output_blocks[b]`; every one of these modules returns a plain tensor (B, C, h, w) from its
`forward` (diffusers 0.42: `ResnetBlock2D`, `Attention` with the default `AttnProcessor2_0`,
`Upsample2D`), so a forward hook sees that tensor as its `output` argument.
"""

from __future__ import annotations

import logging
import operator

import torch
from diffusers import UNet2DModel

logger = logging.getLogger(__name__)


def decoder_block_names(unet: UNet2DModel) -> list[str]:
    """Module paths of the decoder blocks, index i == guided-diffusion `output_blocks[i]`.

    Block i sits at level `i // n` of `unet.up_blocks` (lowest resolution first), position
    `j = i % n`, with n = the level's number of resnets (`layers_per_block + 1`). Its output is that
    of the level's upsampler when j is the last position and the level upsamples, else that of
    `attentions[j]` when the level has attention, else that of `resnets[j]`.

    Raises:
        ValueError: An up block has no `resnets` (not a UNet2DModel-style decoder).
    """
    names = []
    for level, up_block in enumerate(unet.up_blocks):
        resnets = getattr(up_block, "resnets", None)
        if resnets is None:
            raise ValueError(
                f"up_blocks.{level} ({type(up_block).__name__}) has no resnets; cannot number its blocks"
            )
        has_upsampler = getattr(up_block, "upsamplers", None) is not None
        has_attention = getattr(up_block, "attentions", None) is not None
        for position in range(len(resnets)):
            if has_upsampler and position == len(resnets) - 1:
                names.append(f"up_blocks.{level}.upsamplers.0")
            elif has_attention:
                names.append(f"up_blocks.{level}.attentions.{position}")
            else:
                names.append(f"up_blocks.{level}.resnets.{position}")
    return names


def decoder_block(unet: UNet2DModel, index: int) -> torch.nn.Module:
    """The module whose output equals guided-diffusion `output_blocks[index]`'s output.

    Raises:
        ValueError: `index` is not a valid decoder block index of this UNet.
    """
    names = decoder_block_names(unet)
    try:
        position = None if isinstance(index, bool) else operator.index(index)  # ints, numpy ints; not 1.0
    except TypeError:
        position = None
    if position is None or not 0 <= position < len(names):
        raise ValueError(
            f"decoder block index {index!r} is invalid: this UNet has {len(names)} decoder blocks, "
            f"valid indices are the integers 0..{len(names) - 1}"
        )
    return unet.get_submodule(names[position])

