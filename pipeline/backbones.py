"""Diffusion UNet backbones: load a checkpoint into diffusers' `UNet2DModel`, name its decoder blocks.

Two checkpoint families are accepted:

* guided-diffusion ("ADM", Dhariwal & Nichol 2021), the format of the paper's models (`ffhq.pt`,
  `lsun_*.pt`): a plain state dict, saved with `torch.save` or as `.safetensors`. The architecture
  is read from the tensor shapes and converted exactly to a `UNet2DModel`.
* diffusers: a model folder (`config.json` + weights), a pipeline folder with a `unet/` subfolder,
  or one `.safetensors` file whose config is in its metadata (key "config") or in a `config.json`
  beside it.

Decoder blocks are numbered as guided-diffusion numbers its `output_blocks`: 0 is the first block
at the lowest resolution, and there are `layers_per_block + 1` blocks per resolution level. For
block `b`, `decoder_block(unet, b)` is the diffusers module whose output equals the output of
ADM's `output_blocks[b]`; every one of these modules returns a plain tensor (B, C, h, w) from its
`forward` (diffusers 0.42: `ResnetBlock2D`, `Attention` with the default `AttnProcessor2_0`,
`Upsample2D`), so a forward hook sees that tensor as its `output` argument.
"""

from __future__ import annotations

import itertools
import json
import logging
import operator
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import safetensors
import torch
from diffusers import UNet2DModel
from diffusers.utils import is_accelerate_available

from pipeline.datasets import file_sha256

logger = logging.getLogger(__name__)

SOURCE_GUIDED_DIFFUSION = "guided-diffusion"
SOURCE_DIFFUSERS = "diffusers"

# guided-diffusion normalises with GroupNorm(32, C, eps=1e-5) everywhere, attention included.
ADM_NORM_GROUPS = 32
ADM_NORM_EPS = 1e-5

_DIFFUSERS_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

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
class Backbone:
    """A loaded diffusion UNet and where it came from.

    Attributes:
        unet: The network, in eval mode, float32, on the CPU.
        checkpoint_sha256: SHA-256 hex digest of the checkpoint file (for a diffusers folder: of its
            weights file).
        architecture: The `UNet2DModel` config as a plain JSON-serialisable dict.
        source_format: "guided-diffusion" or "diffusers".
    """

    unet: UNet2DModel
    checkpoint_sha256: str
    architecture: dict
    source_format: str


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


def load_backbone(path: str | Path, head_channels: int = 64) -> Backbone:
    """Load a diffusion UNet checkpoint as a float32 `UNet2DModel` in eval mode on the CPU.

    Args:
        path: A guided-diffusion state dict (`.pt`/`.pth`/`.safetensors`), a diffusers model or
            pipeline folder, or a diffusers-format `.safetensors` file with its config.
        head_channels: Channels per attention head of a guided-diffusion model (its
            `num_head_channels`; the paper's models use 64). Shapes cannot tell it; unused for
            diffusers checkpoints, whose config says it.

    Returns:
        The backbone with its checksum, architecture and source format.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: The file is not a readable state dict of a supported UNet (the message names
            the file and the problem), or it would need arbitrary code to unpickle.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"backbone checkpoint not found: {path}")
    if path.is_dir():
        unet, weights_path = _load_diffusers_folder(path)
        return _make_backbone(unet, file_sha256(weights_path), SOURCE_DIFFUSERS)
    state_dict, metadata = read_state_dict(path)
    source_format = detect_source_format(state_dict, path)
    if source_format == SOURCE_GUIDED_DIFFUSION:
        layout = infer_adm_layout(state_dict, path)
        logger.info("%s: guided-diffusion UNet %s", path, layout)
        config = adm_unet_config(layout, head_channels, source=path)
        state_dict = convert_adm_state_dict(state_dict, layout, head_channels, source=path)
    else:
        config = _diffusers_file_config(path, metadata)
    unet = _build_unet(config, state_dict, path)
    return _make_backbone(unet, file_sha256(path), source_format)


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a state dict from a `.safetensors` file or a `torch.save` file, never unpickling code.

    Args:
        path: The file.

    Returns:
        The tensors by name, and the safetensors metadata (empty for `torch.save` files).

    Raises:
        ValueError: The file is unreadable, truncated, not a state dict, or a pickle that needs
            arbitrary code (refused by `torch.load(weights_only=True)`).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            with safetensors.safe_open(str(path), framework="pt", device="cpu") as handle:
                metadata = dict(handle.metadata() or {})
                loaded = {name: handle.get_tensor(name) for name in handle.keys()}
        except (safetensors.SafetensorError, OSError) as error:
            raise ValueError(
                f"{path}: not a readable safetensors file (truncated or corrupt?); expected a state dict "
                f"of tensors: {error}"
            ) from error
    else:
        metadata = {}
        loaded = _torch_load_weights_only(path)
    _check_is_state_dict(loaded, path)
    return dict(loaded), metadata


def detect_source_format(state_dict: Mapping[str, torch.Tensor], source: str | Path = "checkpoint") -> str:
    """Tell a guided-diffusion state dict from a diffusers one by its key names.

    Raises:
        ValueError: The keys look like neither.
    """
    if any(key.startswith(("input_blocks.", "time_embed.")) for key in state_dict):
        return SOURCE_GUIDED_DIFFUSION
    if any(key.startswith("down_blocks.") for key in state_dict):
        return SOURCE_DIFFUSERS
    examples = sorted(state_dict)[:5]
    raise ValueError(
        f"{source}: not a diffusion UNet state dict: expected guided-diffusion keys ('input_blocks.*', "
        f"'time_embed.*') or diffusers keys ('down_blocks.*'), found e.g. {examples}"
    )


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


def randomly_initialised_unet(config: Mapping, seed: int) -> UNet2DModel:
    """A `UNet2DModel` of the given configuration with fresh random weights (diffusers' own
    initialisation), seeded without touching the global random state.

    With the configuration of a trained model this is the "same network, random weights"
    baseline: what the features owe to training rather than to the architecture.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DModel.from_config(dict(config))
    return unet.eval()


def _torch_load_weights_only(path: Path) -> object:
    """`torch.load` that unpickles tensors and plain containers only; failures become ValueError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path}: refused by torch.load(weights_only=True): it is corrupt or needs arbitrary code to "
            f"unpickle ({_weights_only_reason(error)}); such files are never unpickled unsafely; expected a "
            "state dict of tensors (a plain torch.save of a dict) or a .safetensors file"
        ) from error
    except Exception as error:  # torch.load's parsers raise KeyError, RuntimeError, EOFError, ... on bad bytes
        raise ValueError(
            f"{path}: not a readable torch.save file (truncated or corrupt?); expected a state dict of "
            f"tensors: {type(error).__name__}: {error}"
        ) from error


def _weights_only_reason(error: pickle.UnpicklingError) -> str:
    """The specific reason inside torch's long weights_only message (e.g. "Unsupported global: ...")."""
    text = str(error)
    _, marker, reason = text.partition("WeightsUnpickler error:")
    if not marker:
        return " ".join(text.split())[:300]
    reason = reason.split("Please use")[0].split("Check the documentation")[0]
    return " ".join(reason.split()) or "no reason given"


def _check_is_state_dict(loaded: object, path: Path) -> None:
    """Raise ValueError unless `loaded` maps names to tensors."""
    if not isinstance(loaded, Mapping) or not loaded:
        raise ValueError(
            f"{path}: expected a state dict (a non-empty mapping of names to tensors), got {type(loaded).__name__}"
        )
    not_tensors = [
        name for name, value in loaded.items() if not isinstance(name, str) or not isinstance(value, torch.Tensor)
    ]
    if not_tensors:
        raise ValueError(
            f"{path}: expected a plain state dict (names to tensors), but these entries are not tensors: "
            f"{not_tensors[:5]}"
        )


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


def _diffusers_file_config(path: Path, metadata: Mapping[str, str]) -> dict:
    """Config of a diffusers-format weights file: its metadata's "config", else `config.json` beside it."""
    if "config" in metadata:
        try:
            return json.loads(metadata["config"])
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: the 'config' metadata entry is not valid JSON: {error}") from error
    config_path = path.parent / "config.json"
    if not config_path.is_file():
        raise ValueError(
            f"{path}: diffusers-format weights need a UNet2DModel config: none in the file's metadata "
            f"(key 'config') and no {config_path}"
        )
    return _read_config_json(config_path)


def _read_config_json(config_path: Path) -> dict:
    """Read a diffusers `config.json`, refusing configs of other model classes."""
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{config_path}: not a readable JSON config: {error}") from error
    class_name = config.get("_class_name", UNet2DModel.__name__) if isinstance(config, dict) else None
    if class_name != UNet2DModel.__name__:
        found = class_name or type(config).__name__
        raise ValueError(f"{config_path}: expected a UNet2DModel config, found {found}")
    return config


def _build_unet(config: Mapping, state_dict: Mapping[str, torch.Tensor], source: Path) -> UNet2DModel:
    """Instantiate `UNet2DModel(config)` without initialising weights, then load `state_dict` strictly."""
    class_name = config.get("_class_name", UNet2DModel.__name__)
    if class_name != UNet2DModel.__name__:
        raise ValueError(f"{source}: expected a UNet2DModel config, found {class_name}")
    with torch.device("meta"):
        unet = UNet2DModel.from_config(dict(config))
    parameters = {name: tensor.to(torch.float32).contiguous() for name, tensor in state_dict.items()}
    try:
        unet.load_state_dict(parameters, strict=True, assign=True)
    except RuntimeError as error:
        raise ValueError(f"{source}: the weights do not fit the UNet2DModel config: {error}") from error
    assert not any(tensor.is_meta for tensor in [*unet.parameters(), *unet.buffers()]), "uninitialised tensors"
    return unet.eval()


def _load_diffusers_folder(folder: Path) -> tuple[UNet2DModel, Path]:
    """Load a diffusers model folder, or the `unet/` of a pipeline folder; also return its weights file."""
    model_folder = folder if (folder / "config.json").is_file() else folder / "unet"
    if not (model_folder / "config.json").is_file():
        raise ValueError(f"{folder}: not a diffusers model folder: no config.json in it or in {folder / 'unet'}")
    _read_config_json(model_folder / "config.json")
    weights_paths = [model_folder / name for name in _DIFFUSERS_WEIGHT_NAMES if (model_folder / name).is_file()]
    if not weights_paths:
        raise ValueError(f"{model_folder}: no weights file, expected one of {list(_DIFFUSERS_WEIGHT_NAMES)}")
    try:
        unet = UNet2DModel.from_pretrained(
            str(model_folder),
            local_files_only=True,
            use_safetensors=weights_paths[0].suffix == ".safetensors",
            dtype=torch.float32,
            low_cpu_mem_usage=is_accelerate_available(),  # without accelerate diffusers would warn and fall back
        )
    except Exception as error:  # from_pretrained raises OSError, ValueError, RuntimeError, SafetensorError, ...
        raise ValueError(
            f"{model_folder}: could not load it as a diffusers UNet2DModel (a damaged weights file, or weights of "
            f"another architecture than its config.json?): {_first_lines(error)}"
        ) from error
    # from_pretrained prefers the .safetensors file when both exist, as the list order does.
    return unet.eval(), weights_paths[0]


def _first_lines(error: Exception, count: int = 4) -> str:
    """An error's first lines: a mismatch between two large models can list hundreds."""
    lines = str(error).strip().splitlines()
    return "\n".join(lines[:count]) + (f"\n… ({len(lines) - count} more lines)" if len(lines) > count else "")


def _reallocate_weights(unet: torch.nn.Module) -> None:
    """Copies every weight into freshly allocated memory, so a model computes the same bits
    whatever file it came from.

    safetensors hands out tensors at arbitrary byte offsets of the file, and some CPU kernels
    round differently on unaligned data: on an AVX2 CPU the same weights loaded from a
    safetensors file gave outputs 1.2e-6 away from the in-memory model's.
    """
    with torch.no_grad():
        for tensor in itertools.chain(unet.parameters(), unet.buffers()):
            tensor.data = tensor.data.clone()


def _make_backbone(unet: UNet2DModel, checksum: str, source_format: str) -> Backbone:
    """Wrap a loaded UNet with its checksum and its config as plain JSON data."""
    _reallocate_weights(unet)
    config = {key: value for key, value in unet.config.items() if not key.startswith("_")}
    architecture = json.loads(json.dumps(config))  # tuples -> lists, proves it serialises
    parameter_count = sum(parameter.numel() for parameter in unet.parameters())
    logger.info("loaded %s UNet2DModel, %d parameters, sha256 %s", source_format, parameter_count, checksum[:12])
    return Backbone(unet=unet, checkpoint_sha256=checksum, architecture=architecture, source_format=source_format)
