"""Reading checkpoint files safely: tensors only, never arbitrary pickled code."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from pathlib import Path

import safetensors
import torch

logger = logging.getLogger(__name__)


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

