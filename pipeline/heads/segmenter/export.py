"""The segmenter as an ONNX model, which runs where there is no torch (onnxruntime, browsers, C++)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from pipeline.runtime.atomic import replaced_file
from pipeline.sizes import as_shape

logger = logging.getLogger(__name__)
OPSET = 17


def export_onnx(network: torch.nn.Module, image_size: int | list[int], path: str | Path) -> Path:
    """Writes the network (images in [-1, 1] → logits) as ONNX with a free batch axis.

    Input "image": float32 (B, 3, H, W) at the segmenter's own size; output "logits": (B, K, H, W).
    """
    height, width = as_shape(image_size)
    example = torch.zeros(1, 3, height, width)
    was_training = network.training
    network.eval()
    with replaced_file(Path(path)) as staging, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's notes on traced shape checks
        torch.onnx.export(
            network, (example,), str(staging), dynamo=False, opset_version=OPSET, input_names=["image"],
            output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        )
    network.train(was_training)
    return Path(path)
