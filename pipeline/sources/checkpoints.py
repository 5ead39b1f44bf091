"""Diffusion UNet backbones: load a checkpoint into diffusers' `UNet2DModel`.

Two checkpoint families are accepted:

* guided-diffusion ("ADM", Dhariwal & Nichol 2021), the format of the paper's models (`ffhq.pt`,
  `lsun_*.pt`): a plain state dict, saved with `torch.save` or as `.safetensors`. The architecture
  is read from the tensor shapes and converted exactly to a `UNet2DModel`.
* diffusers: a model folder (`config.json` + weights), a pipeline folder with a `unet/` subfolder,
  or one `.safetensors` file whose config is in its metadata (key "config") or in a `config.json`
  beside it.

The guided-diffusion conversion is in `pipeline.sources.adm`.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DModel
from diffusers.utils import is_accelerate_available

from pipeline.runtime.hashing import file_sha256
from pipeline.sources.adm.convert import adm_unet_config, convert_adm_state_dict, infer_adm_layout
from pipeline.sources.adm.files import read_state_dict

logger = logging.getLogger(__name__)

SOURCE_GUIDED_DIFFUSION = "guided-diffusion"
SOURCE_DIFFUSERS = "diffusers"


_DIFFUSERS_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


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


def diffusers_weights_file(model_folder: Path) -> Path:
    """The weights file diffusers' `from_pretrained` loads from a model folder: the .safetensors
    one when both exist (its preference), else the .bin one.

    Raises:
        ValueError: the folder has neither.
    """
    for name in _DIFFUSERS_WEIGHT_NAMES:
        if (model_folder / name).is_file():
            return model_folder / name
    raise ValueError(f"{model_folder}: no weights file, expected one of {list(_DIFFUSERS_WEIGHT_NAMES)}")


def _load_diffusers_folder(folder: Path) -> tuple[UNet2DModel, Path]:
    """Load a diffusers model folder, or the `unet/` of a pipeline folder; also return its weights file."""
    model_folder = folder if (folder / "config.json").is_file() else folder / "unet"
    if not (model_folder / "config.json").is_file():
        raise ValueError(f"{folder}: not a diffusers model folder: no config.json in it or in {folder / 'unet'}")
    _read_config_json(model_folder / "config.json")
    weights_path = diffusers_weights_file(model_folder)
    try:
        unet = UNet2DModel.from_pretrained(
            str(model_folder),
            local_files_only=True,
            use_safetensors=weights_path.suffix == ".safetensors",
            dtype=torch.float32,
            low_cpu_mem_usage=is_accelerate_available(),  # without accelerate diffusers would warn and fall back
        )
    except Exception as error:  # from_pretrained raises OSError, ValueError, RuntimeError, SafetensorError, ...
        raise ValueError(
            f"{model_folder}: could not load it as a diffusers UNet2DModel (a damaged weights file, or weights of "
            f"another architecture than its config.json?): {_first_lines(error)}"
        ) from error
    return unet.eval(), weights_path


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


def plain_config(config: Mapping) -> dict:
    """A diffusers config as plain JSON data: its own keys only (not `_name_or_path`, the
    diffusers version…, which say nothing of the weights), tuples as lists."""
    return json.loads(json.dumps({key: value for key, value in config.items() if not key.startswith("_")}))


def _make_backbone(unet: UNet2DModel, checksum: str, source_format: str) -> Backbone:
    """Wrap a loaded UNet with its checksum and its config as plain JSON data."""
    _reallocate_weights(unet)
    architecture = plain_config(unet.config)
    parameter_count = sum(parameter.numel() for parameter in unet.parameters())
    logger.info("loaded %s UNet2DModel, %d parameters, sha256 %s", source_format, parameter_count, checksum[:12])
    return Backbone(unet=unet, checkpoint_sha256=checksum, architecture=architecture, source_format=source_format)

