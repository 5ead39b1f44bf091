"""guided-diffusion ("ADM") state dicts: their architecture read from tensor shapes, converted exactly to diffusers."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


# guided-diffusion normalises with GroupNorm(32, C, eps=1e-5) everywhere, attention included.
ADM_NORM_GROUPS = 32
ADM_NORM_EPS = 1e-5


# guided-diffusion ResBlock parameter prefixes -> diffusers ResnetBlock2D parameter prefixes.
_RESBLOCK_RENAMES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


# Renames for modules whose parameters keep their shapes ("" = the module's own weight/bias).
_PLAIN_RENAMES = {
    "copy": {"": ""},
    "resblock": _RESBLOCK_RENAMES,
    "conv_downsample": {"op": "conv"},
    "conv_upsample": {"conv": "conv"},
}


_BLOCK_SECTIONS = ("input_blocks.", "middle_block.", "output_blocks.")
_SUBMODULE_PATTERN = re.compile(r"^((?:input_blocks|output_blocks)\.\d+\.\d+|middle_block\.\d+)\.(.+)$")


@dataclass(frozen=True)
class AdmLayout:
    """The architecture of a guided-diffusion UNet, as far as its tensor shapes tell it.

    Attributes:
        in_channels: Image channels in.
        out_channels: Channels out (twice `in_channels` when the model learns its variance).
        level_channels: Channels of each resolution level, highest resolution first (C * channel_mult).
        num_res_blocks: ResBlocks per encoder level (the decoder has one more per level).
        attention_levels: Whether each level's blocks carry self-attention.
        scale_shift_norm: Whether the time embedding scales and shifts the second GroupNorm.
        resblock_updown: Whether up/downsampling is done by ResBlocks (else by 3x3 convolutions).
        num_classes: Classes of the label embedding of a class-conditional model, else None.
    """

    in_channels: int
    out_channels: int
    level_channels: tuple[int, ...]
    num_res_blocks: int
    attention_levels: tuple[bool, ...]
    scale_shift_norm: bool
    resblock_updown: bool
    num_classes: int | None = None


def infer_adm_layout(state_dict: Mapping[str, torch.Tensor], source: str | Path = "checkpoint") -> AdmLayout:
    """Read a guided-diffusion UNet's architecture from its state dict's keys and shapes.

    Args:
        state_dict: The guided-diffusion parameters.
        source: Names the checkpoint in error messages.

    Raises:
        ValueError: The layout is one `UNet2DModel` cannot express exactly (attention in only some
            blocks of a level, parameter-free resampling, channel_mult[0] != 1, ...).
    """
    # 1. Module structure: levels, res blocks per level, attention, kind of resampling.
    actual_kinds = _submodule_kinds(state_dict, source)
    output_kinds = _block_kind_lists(actual_kinds, "output_blocks")
    blocks_per_level = _decoder_blocks_per_level(output_kinds)
    num_levels = len(output_kinds) // blocks_per_level
    if num_levels == 0 or len(output_kinds) % blocks_per_level or blocks_per_level < 2:
        raise ValueError(f"{source}: {len(output_kinds)} output blocks do not form whole resolution levels")
    upsampler_kinds = output_kinds[blocks_per_level - 1][1:]
    structure = {
        "num_levels": num_levels,
        "num_res_blocks": blocks_per_level - 1,
        "attention_levels": tuple(
            "attention" in output_kinds[(num_levels - 1 - level) * blocks_per_level] for level in range(num_levels)
        ),
        "resblock_updown": num_levels == 1 or upsampler_kinds[-1] == "resblock",
        "class_conditional": "label_emb.weight" in state_dict,
    }
    _check_adm_structure(actual_kinds, structure, source)
    # 2. Widths from shapes: per-level channels from each level's first decoder ResBlock.
    _check_time_embedding_width(state_dict, source)
    first_decoder_blocks = [(num_levels - 1 - level) * blocks_per_level for level in range(num_levels)]
    level_channels = tuple(
        _shape(state_dict, f"output_blocks.{block}.0.out_layers.3.weight", source)[0]
        for block in first_decoder_blocks
    )
    return AdmLayout(
        in_channels=_shape(state_dict, "input_blocks.0.0.weight", source)[1],
        out_channels=_shape(state_dict, "out.2.weight", source)[0],
        level_channels=level_channels,
        num_res_blocks=structure["num_res_blocks"],
        attention_levels=structure["attention_levels"],
        scale_shift_norm=_uses_scale_shift_norm(state_dict, source),
        resblock_updown=structure["resblock_updown"],
        num_classes=_shape(state_dict, "label_emb.weight", source)[0] if structure["class_conditional"] else None,
    )


def adm_unet_config(layout: AdmLayout, head_channels: int = 64, source: str | Path = "checkpoint") -> dict:
    """The `UNet2DModel` config that computes exactly what the guided-diffusion UNet computes.

    Args:
        layout: The guided-diffusion architecture.
        head_channels: Channels per attention head.
        source: Names the checkpoint in error messages.

    Raises:
        ValueError: An attention width is not a multiple of `head_channels`.
    """
    attention_widths = [c for c, has in zip(layout.level_channels, layout.attention_levels) if has]
    for width in [*attention_widths, layout.level_channels[-1]]:
        if head_channels <= 0 or width % head_channels:
            raise ValueError(
                f"{source}: attention over {width} channels cannot be split into heads of {head_channels} "
                "channels; pass the model's num_head_channels as head_channels"
            )
    if layout.resblock_updown:
        plain_down, plain_up = "ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D"
    else:
        plain_down, plain_up = "DownBlock2D", "UpBlock2D"
    down_block_types = [("AttnDownBlock2D" if has else plain_down) for has in layout.attention_levels]
    up_block_types = [("AttnUpBlock2D" if has else plain_up) for has in reversed(layout.attention_levels)]
    resample_type = "resnet" if layout.resblock_updown else "conv"
    return {
        "sample_size": None,
        "in_channels": layout.in_channels,
        "out_channels": layout.out_channels,
        "block_out_channels": list(layout.level_channels),
        "layers_per_block": layout.num_res_blocks,
        "down_block_types": down_block_types,
        "up_block_types": up_block_types,
        "downsample_type": resample_type,
        "upsample_type": resample_type,
        "downsample_padding": 1,
        "attention_head_dim": head_channels,
        "norm_num_groups": ADM_NORM_GROUPS,
        # Without this the middle block's attention has no GroupNorm under "scale_shift".
        "attn_norm_num_groups": ADM_NORM_GROUPS,
        "norm_eps": ADM_NORM_EPS,
        "resnet_time_scale_shift": "scale_shift" if layout.scale_shift_norm else "default",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "act_fn": "silu",
        "num_class_embeds": layout.num_classes,
    }


def convert_adm_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    layout: AdmLayout,
    head_channels: int = 64,
    source: str | Path = "checkpoint",
) -> dict[str, torch.Tensor]:
    """Rename and reshape guided-diffusion parameters into `UNet2DModel` parameters (float32).

    Raises:
        ValueError: Some guided-diffusion parameters have no place in the converted model.
    """
    remaining = {name: tensor.to(torch.float32) for name, tensor in state_dict.items()}
    converted: dict[str, torch.Tensor] = {}
    plan = _adm_module_plan(
        num_levels=len(layout.level_channels),
        num_res_blocks=layout.num_res_blocks,
        attention_levels=layout.attention_levels,
        resblock_updown=layout.resblock_updown,
        class_conditional=layout.num_classes is not None,
    )
    for kind, adm_prefix, diffusers_prefix in plan:
        if kind == "attention":
            converted.update(_convert_attention(remaining, adm_prefix, diffusers_prefix, head_channels))
        else:
            converted.update(_move_parameters(remaining, adm_prefix, diffusers_prefix, _PLAIN_RENAMES[kind]))
    if remaining:
        raise ValueError(f"{source}: guided-diffusion parameters with no counterpart: {sorted(remaining)[:10]}")
    return converted


def _shape(state_dict: Mapping[str, torch.Tensor], key: str, source: str | Path) -> tuple[int, ...]:
    """Shape of a required parameter; ValueError naming it when it is absent."""
    if key not in state_dict:
        raise ValueError(f"{source}: guided-diffusion parameter {key!r} is missing")
    return tuple(state_dict[key].shape)


def _uses_scale_shift_norm(state_dict: Mapping[str, torch.Tensor], source: str | Path) -> bool:
    """Scale-shift norm projects the time embedding to 2C (scale and shift), else to C."""
    projection_width = _shape(state_dict, "middle_block.0.emb_layers.1.weight", source)[0]
    channels = _shape(state_dict, "middle_block.0.out_layers.3.weight", source)[0]
    if projection_width not in (channels, 2 * channels):
        raise ValueError(
            f"{source}: middle_block.0 projects the time embedding to {projection_width} channels for "
            f"{channels}-channel features; expected {channels} or {2 * channels}"
        )
    return projection_width == 2 * channels


def _check_time_embedding_width(state_dict: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """UNet2DModel embeds timesteps with as many channels as its first level has (channel_mult[0] == 1)."""
    embedding_channels = _shape(state_dict, "time_embed.0.weight", source)[1]
    first_level_channels = _shape(state_dict, "input_blocks.0.0.weight", source)[0]
    if embedding_channels != first_level_channels:
        raise ValueError(
            f"{source}: the timestep embedding has {embedding_channels} channels but the first level has "
            f"{first_level_channels} (channel_mult[0] != 1); UNet2DModel cannot express that"
        )


def _classify_submodule(suffixes: set[str]) -> str:
    """Kind of a guided-diffusion block submodule, from its parameter names."""
    if "in_layers.0.weight" in suffixes:
        return "resblock"
    if "qkv.weight" in suffixes:
        return "attention"
    if "op.weight" in suffixes:
        return "conv_downsample"
    if "conv.weight" in suffixes:
        return "conv_upsample"
    if "weight" in suffixes:
        return "copy"
    return "unknown(" + ",".join(sorted(suffixes)) + ")"


def _submodule_kinds(state_dict: Mapping[str, torch.Tensor], source: str | Path) -> dict[str, str]:
    """Kind of every submodule of input/middle/output blocks, e.g. {"input_blocks.1.0": "resblock"}.

    Raises:
        ValueError: A block index has no parameters at all (e.g. parameter-free resampling).
    """
    suffixes: dict[str, set[str]] = {}
    for key in state_dict:
        match = _SUBMODULE_PATTERN.match(key)
        if match:
            suffixes.setdefault(match.group(1), set()).add(match.group(2))
    kinds = {prefix: _classify_submodule(names) for prefix, names in suffixes.items()}
    for section in ("input_blocks", "output_blocks"):
        indices = {int(prefix.split(".")[1]) for prefix in kinds if prefix.startswith(section + ".")}
        missing = sorted(set(range(max(indices, default=-1) + 1)) - indices)
        if not indices or missing:
            raise ValueError(
                f"{source}: {section} {missing or '(all)'} have no parameters: parameter-free resampling "
                "(conv_resample=False) or a truncated state dict, which cannot be converted"
            )
    return kinds


def _block_kind_lists(kinds: Mapping[str, str], section: str) -> list[list[str]]:
    """Per block of a section, the kinds of its submodules in order."""
    blocks: dict[int, dict[int, str]] = {}
    for prefix, kind in kinds.items():
        name, block, position = (prefix.split(".") + [""])[:3]
        if name == section:
            blocks.setdefault(int(block), {})[int(position)] = kind
    return [[blocks[block][position] for position in sorted(blocks[block])] for block in sorted(blocks)]


def _decoder_blocks_per_level(output_kinds: list[list[str]]) -> int:
    """Decoder blocks per level: up to and including the first block that ends in an upsampler."""
    for index, kinds in enumerate(output_kinds):
        if len(kinds) > 1 and kinds[-1] in ("resblock", "conv_upsample"):
            return index + 1
    return len(output_kinds)


def _check_adm_structure(actual_kinds: Mapping[str, str], structure: dict, source: str | Path) -> None:
    """Compare the checkpoint's blocks with those of the regular layout that `structure` describes."""
    plan = _adm_module_plan(**structure)
    expected = {prefix: kind for kind, prefix, _ in plan if prefix.startswith(_BLOCK_SECTIONS)}
    if expected == dict(actual_kinds):
        return
    differing = sorted(set(expected) | set(actual_kinds), key=_natural_key)
    first = next(prefix for prefix in differing if expected.get(prefix) != actual_kinds.get(prefix))
    raise ValueError(
        f"{source}: unsupported guided-diffusion layout: {first} holds {actual_kinds.get(first, 'nothing')} "
        f"where a UNet with {structure['num_levels']} levels, {structure['num_res_blocks']} res blocks per "
        f"level and attention at levels {[i for i, has in enumerate(structure['attention_levels']) if has]} "
        f"has {expected.get(first, 'nothing')}. Convertible layouts have attention in every block of a "
        "level or in none, and resample with ResBlocks (resblock_updown) or 3x3 convolutions."
    )


def _natural_key(prefix: str) -> list[object]:
    """Sort key that orders "input_blocks.10" after "input_blocks.9"."""
    return [int(part) if part.isdigit() else part for part in prefix.split(".")]


def _adm_module_plan(
    num_levels: int,
    num_res_blocks: int,
    attention_levels: tuple[bool, ...],
    resblock_updown: bool,
    class_conditional: bool,
) -> list[tuple[str, str, str]]:
    """Every guided-diffusion module as (kind, ADM prefix, diffusers prefix), in model order."""
    plan = [
        ("copy", "time_embed.0", "time_embedding.linear_1"),
        ("copy", "time_embed.2", "time_embedding.linear_2"),
        ("copy", "input_blocks.0.0", "conv_in"),
    ]
    if class_conditional:
        plan.append(("copy", "label_emb", "class_embedding"))
    plan += _encoder_plan(num_levels, num_res_blocks, attention_levels, resblock_updown)
    plan += [
        ("resblock", "middle_block.0", "mid_block.resnets.0"),
        ("attention", "middle_block.1", "mid_block.attentions.0"),
        ("resblock", "middle_block.2", "mid_block.resnets.1"),
    ]
    plan += _decoder_plan(num_levels, num_res_blocks, attention_levels, resblock_updown)
    plan += [("copy", "out.0", "conv_norm_out"), ("copy", "out.2", "conv_out")]
    return plan


def _encoder_plan(num_levels, num_res_blocks, attention_levels, resblock_updown) -> list[tuple[str, str, str]]:
    """Encoder part of `_adm_module_plan`: input_blocks 1.. -> down_blocks."""
    plan = []
    block = 1
    for level in range(num_levels):
        for position in range(num_res_blocks):
            plan.append(("resblock", f"input_blocks.{block}.0", f"down_blocks.{level}.resnets.{position}"))
            if attention_levels[level]:
                plan.append(("attention", f"input_blocks.{block}.1", f"down_blocks.{level}.attentions.{position}"))
            block += 1
        if level < num_levels - 1:
            kind = "resblock" if resblock_updown else "conv_downsample"
            plan.append((kind, f"input_blocks.{block}.0", f"down_blocks.{level}.downsamplers.0"))
            block += 1
    return plan


def _decoder_plan(num_levels, num_res_blocks, attention_levels, resblock_updown) -> list[tuple[str, str, str]]:
    """Decoder part of `_adm_module_plan`: output_blocks -> up_blocks (lowest resolution first)."""
    plan = []
    block = 0
    for up_level in range(num_levels):
        has_attention = attention_levels[num_levels - 1 - up_level]
        for position in range(num_res_blocks + 1):
            plan.append(("resblock", f"output_blocks.{block}.0", f"up_blocks.{up_level}.resnets.{position}"))
            if has_attention:
                attention_prefix = f"up_blocks.{up_level}.attentions.{position}"
                plan.append(("attention", f"output_blocks.{block}.1", attention_prefix))
            if position == num_res_blocks and up_level < num_levels - 1:
                kind = "resblock" if resblock_updown else "conv_upsample"
                submodule = 2 if has_attention else 1
                plan.append((kind, f"output_blocks.{block}.{submodule}", f"up_blocks.{up_level}.upsamplers.0"))
            block += 1
    return plan


def _move_parameters(
    remaining: dict[str, torch.Tensor], adm_prefix: str, diffusers_prefix: str, renames: Mapping[str, str]
) -> dict[str, torch.Tensor]:
    """Pop a module's weights/biases from `remaining` under their diffusers names (absent ones skipped)."""
    moved = {}
    for adm_part, diffusers_part in renames.items():
        for parameter in ("weight", "bias"):
            adm_key = ".".join(part for part in (adm_prefix, adm_part, parameter) if part)
            if adm_key in remaining:
                diffusers_key = ".".join(part for part in (diffusers_prefix, diffusers_part, parameter) if part)
                moved[diffusers_key] = remaining.pop(adm_key)
    return moved


def _convert_attention(
    remaining: dict[str, torch.Tensor], adm_prefix: str, diffusers_prefix: str, head_channels: int
) -> dict[str, torch.Tensor]:
    """guided-diffusion AttentionBlock (norm, qkv, proj_out Conv1d) -> diffusers Attention (Linear).

    The qkv conv's output channels are ordered (head, [q, k, v], head_dim) (QKVAttentionLegacy);
    diffusers' to_q/to_k/to_v outputs are (head, head_dim). So q/k/v are taken per head, not as
    contiguous thirds.
    """
    qkv_weight = remaining.pop(f"{adm_prefix}.qkv.weight")[:, :, 0]  # (3C, C, 1) -> (3C, C)
    qkv_bias = remaining.pop(f"{adm_prefix}.qkv.bias")  # (3C,)
    channels = qkv_weight.shape[1]
    heads = channels // head_channels
    per_head_weight = qkv_weight.reshape(heads, 3, head_channels, channels)  # (head, qkv, head_dim, C)
    per_head_bias = qkv_bias.reshape(heads, 3, head_channels)  # (head, qkv, head_dim)
    converted = {
        f"{diffusers_prefix}.group_norm.weight": remaining.pop(f"{adm_prefix}.norm.weight"),
        f"{diffusers_prefix}.group_norm.bias": remaining.pop(f"{adm_prefix}.norm.bias"),
        f"{diffusers_prefix}.to_out.0.weight": remaining.pop(f"{adm_prefix}.proj_out.weight")[:, :, 0],  # (C, C)
        f"{diffusers_prefix}.to_out.0.bias": remaining.pop(f"{adm_prefix}.proj_out.bias"),
    }
    for index, name in enumerate(("to_q", "to_k", "to_v")):
        converted[f"{diffusers_prefix}.{name}.weight"] = per_head_weight[:, index].reshape(channels, channels)
        converted[f"{diffusers_prefix}.{name}.bias"] = per_head_bias[:, index].reshape(channels)
    return converted

