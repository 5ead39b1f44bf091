"""A tiny random UNet for tests and benchmarks (no checkpoint needed)."""

from __future__ import annotations

import logging

from diffusers import UNet2DModel

from pipeline.sources.adm.convert import AdmLayout, adm_unet_config
from pipeline.sources.checkpoints import randomly_initialised_unet

logger = logging.getLogger(__name__)


def make_tiny_unet(sample_size: int = 32, seed: int = 0) -> UNet2DModel:
    """A small random `UNet2DModel` with the paper's decoder structure, for tests.

    Five levels with channels (32, 32, 64, 64, 64), 2 ResBlocks per encoder level (so 15 decoder
    blocks, numbered like the paper's 18), resblock up/downsampling, scale-shift norm, and
    attention (2 heads of 32) at the two lowest resolutions. 3 channels in and out. 3.0 M parameters;
    a 32x32 forward takes milliseconds on a CPU.

    Args:
        sample_size: Recorded in the config (any size divisible by 16 runs).
        seed: Seeds the initial weights; the global random state is left untouched.
    """
    layout = AdmLayout(
        in_channels=3,
        out_channels=3,
        level_channels=(32, 32, 64, 64, 64),
        num_res_blocks=2,
        attention_levels=(False, False, False, True, True),
        scale_shift_norm=True,
        resblock_updown=True,
    )
    config = adm_unet_config(layout, head_channels=32) | {"sample_size": sample_size}
    return randomly_initialised_unet(config, seed)

