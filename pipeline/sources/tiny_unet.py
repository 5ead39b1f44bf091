"""Tiny random models for tests and benchmarks (no checkpoint needed): a guided-diffusion-style
UNet and a Stable Diffusion-style latent-diffusion folder."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, UNet2DModel

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



def save_tiny_latent_diffusion(
    folder: Path, seed: int = 0, cross_attention_dim: int = 32, with_text_encoder: bool = False
) -> Path:
    """A small random Stable Diffusion-style folder (unet/, vae/, scheduler/; text_encoder/ and
    tokenizer/ with `with_text_encoder`), built from diffusers' own tiny test configuration, for
    tests and benchmarks.

    The VAE halves the image side (two levels), so a 64×64 image has 4×32×32 latents; the UNet
    has two levels (32, 64 channels), cross-attention of width `cross_attention_dim` in its
    second down and first up level; the scheduler is SD's scaled-linear β schedule. The text
    encoder is `save_tiny_text_encoder`'s, as wide as the cross-attention.
    """
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=cross_attention_dim,
        )
        vae = AutoencoderKL(
            block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
            down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        )
    finally:
        torch.random.set_rng_state(generator_state)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    scheduler.save_pretrained(folder / "scheduler")
    if with_text_encoder:
        save_tiny_text_encoder(folder, hidden_size=cross_attention_dim, seed=seed)
    return folder


def save_tiny_text_encoder(folder: Path, hidden_size: int = 32, seed: int = 0) -> Path:
    """A small random CLIP text encoder in `folder/text_encoder` and its tokenizer in
    `folder/tokenizer`, as Stable Diffusion folders hold them, built offline (no hub access).

    The tokenizer is CLIP's byte-level BPE over a 516-token vocabulary: the 256 byte symbols, each
    also as a word end (`a</w>`), the merges `c a` and `ca t</w>` (so "a cat" is 4 tokens with the
    special ones), `<|startoftext|>` and `<|endoftext|>` (also the padding, as in SD 1.x), 77
    tokens long. The encoder has 2 layers of width `hidden_size` (4 heads; 77 positions).
    """
    # transformers is needed only here and to encode prompts; importing it takes seconds.
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    symbols = sorted(ByteLevel.alphabet())
    tokens = [*symbols, *(symbol + "</w>" for symbol in symbols), "ca", "cat</w>", "<|startoftext|>", "<|endoftext|>"]
    vocabulary = {token: index for index, token in enumerate(tokens)}
    tokenizer_folder = folder / "tokenizer"
    tokenizer_folder.mkdir(parents=True, exist_ok=True)
    # The files of a real SD folder's tokenizer/, then transformers' own save (adds tokenizer.json).
    (tokenizer_folder / "vocab.json").write_text(json.dumps(vocabulary, ensure_ascii=False, indent=1) + "\n")
    (tokenizer_folder / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_folder, model_max_length=77)
    tokenizer.save_pretrained(tokenizer_folder)
    config = CLIPTextConfig(
        vocab_size=len(vocabulary), hidden_size=hidden_size, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=hidden_size,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(config)
    finally:
        torch.random.set_rng_state(generator_state)
    text_encoder.save_pretrained(folder / "text_encoder")
    return folder
