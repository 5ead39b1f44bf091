"""A trained segmenter on disk (`segmenter.json` + `model.safetensors`, and `model.onnx`), and its predictions."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from pipeline.heads.segmenter.architectures import SegmenterNetwork, build_network
from pipeline.runtime.atomic import replaced_file
from pipeline.sizes import as_shape

SEGMENTER_CONFIG = "segmenter.json"
SEGMENTER_WEIGHTS = "model.safetensors"
SEGMENTER_ONNX = "model.onnx"


@dataclasses.dataclass
class Segmenter:
    """A trained network with what it needs to be used: its classes and the size it works at.

    Attributes:
        network: in eval mode; images in [-1, 1] (B, 3, H, W) → logits (B, K, H, W).
        architecture: its name (`architectures.ARCHITECTURES`).
        class_names: K names; label k is class_names[k].
        ignore_label: the label of unannotated pixels in its training data.
        image_size: S (S×S) or [H, W]: the size it was trained at; images are resized to it.
        record: what training recorded (chosen epoch, settings, data).
    """

    network: SegmenterNetwork
    architecture: str
    class_names: list[str]
    ignore_label: int
    image_size: int | list[int]
    record: dict

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax of the logits for images (B, 3, H, W) in [-1, 1] of any size: float32 (B, K, H, W),
        computed at the segmenter's own size and resized back bilinearly."""
        height, width = images.shape[2:]
        own = as_shape(self.image_size)
        if (height, width) != own:
            images = F.interpolate(images, size=own, mode="bilinear", align_corners=False)
        logits = self.network(images.float())  # (B, K, h, w)
        if (height, width) != own:
            logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        return logits.softmax(dim=1)


def is_segmenter_folder(path: str | Path) -> bool:
    return (Path(path) / SEGMENTER_CONFIG).is_file()


def save_segmenter(segmenter: Segmenter, out_dir: str | Path) -> None:
    """Writes `model.safetensors`, then `segmenter.json` (each replaced whole; the config last)."""
    out_dir = Path(out_dir)
    with replaced_file(out_dir / SEGMENTER_WEIGHTS) as staging:
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in segmenter.network.state_dict().items()}
        save_file(tensors, staging)
    config = {
        "architecture": segmenter.architecture,
        "class_names": segmenter.class_names,
        "ignore_label": segmenter.ignore_label,
        "image_size": segmenter.image_size,
        "input": "float32 (B, 3, H, W), RGB scaled to [-1, 1]; output: logits (B, K, H, W)",
        **segmenter.record,
    }
    with replaced_file(out_dir / SEGMENTER_CONFIG) as staging:
        staging.write_text(json.dumps(config, indent=1))


def load_segmenter(segmenter_dir: str | Path, device: torch.device | str = "cpu") -> Segmenter:
    """Reads a segmenter written by `save_segmenter`.

    Raises:
        FileNotFoundError: the folder holds no segmenter.
        ValueError: its files do not fit together.
    """
    segmenter_dir = Path(segmenter_dir)
    config_path, weights_path = segmenter_dir / SEGMENTER_CONFIG, segmenter_dir / SEGMENTER_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"no trained segmenter in {segmenter_dir} (expected {SEGMENTER_CONFIG} and {SEGMENTER_WEIGHTS})")
    config = json.loads(config_path.read_text())
    width = config.get("settings", {}).get("width", 16)
    network = build_network(config["architecture"], len(config["class_names"]), pretrained=False, width=width)
    try:
        network.load_state_dict(load_file(weights_path))
    except RuntimeError as error:
        raise ValueError(f"{weights_path} does not match {config_path}: {str(error)[:200]}") from None
    known = {"architecture", "class_names", "ignore_label", "image_size", "input"}
    record = {key: value for key, value in config.items() if key not in known}
    return Segmenter(network.to(device).eval(), config["architecture"], config["class_names"], config["ignore_label"],
                     config["image_size"], record)
