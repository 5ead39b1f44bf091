"""The segmentation networks a segmenter can be, from well-kept libraries (no hand-written network).

- "unet": MONAI's residual UNet (channels w-2w-4w-8w, w = `width`, 16 by default; two residual
  units per level): small enough to train from scratch on a CPU (the demo's segmenter).
- "basic-unet": MONAI's BasicUNet (a plain two-convolution UNet, w-w-2w-4w-8w channels).
- "deeplabv3-resnet101": torchvision's DeepLabV3 with a ResNet-101 backbone pretrained on
  ImageNet, the official DatasetDDPM segmenter; needs torchvision (matching the installed torch)
  and its ImageNet weights (downloaded once into torch's hub cache).

Every network takes images in [-1, 1] (B, 3, H, W), the project's model input, and returns
logits (B, K, H, W); an ImageNet backbone's own normalisation is part of the network, so the
exported ONNX model takes the same input.
"""

from __future__ import annotations

import torch

ARCHITECTURES = ("unet", "basic-unet", "deeplabv3-resnet101")
# Each network's input sides must be multiples of this (its total downsampling).
SIZE_MULTIPLES = {"unet": 8, "basic-unet": 16, "deeplabv3-resnet101": 8}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SegmenterNetwork(torch.nn.Module):
    """A segmentation network behind an affine input map: images in [-1, 1] → its own input."""

    def __init__(self, network: torch.nn.Module, mean: tuple[float, ...], std: tuple[float, ...], returns_dict: bool):
        super().__init__()
        self.network = network
        self.returns_dict = returns_dict
        # x in [-1, 1] → ((x + 1) / 2 - mean) / std, per channel: (1, 3, 1, 1)
        self.register_buffer("scale", (0.5 / torch.tensor(std)).view(1, 3, 1, 1))
        self.register_buffer("shift", ((0.5 - torch.tensor(mean)) / torch.tensor(std)).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        output = self.network(images * self.scale + self.shift)
        return output["out"] if self.returns_dict else output  # (B, K, H, W)


def build_network(architecture: str, num_classes: int, pretrained: bool = True, width: int = 16) -> SegmenterNetwork:
    """A freshly initialised network (torch's global generator: seed it first for repeatable weights).

    Args:
        architecture: one of ARCHITECTURES.
        num_classes: K, the output channels.
        pretrained: deeplabv3-resnet101 only: start from the ImageNet backbone (False: random,
            e.g. to load saved weights into it).
        width: the UNets' first level's channels (each level doubles them); not DeepLab's.

    Raises:
        ValueError: an unknown architecture, or deeplabv3-resnet101 without torchvision or its weights.
    """
    if architecture == "unet":
        from monai.networks.nets import UNet

        network = UNet(spatial_dims=2, in_channels=3, out_channels=num_classes, channels=(width, 2 * width, 4 * width, 8 * width),
                       strides=(2, 2, 2), num_res_units=2)
        return SegmenterNetwork(network, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), returns_dict=False)  # the identity
    if architecture == "basic-unet":
        from monai.networks.nets import BasicUNet

        network = BasicUNet(spatial_dims=2, in_channels=3, out_channels=num_classes, features=(width, width, 2 * width, 4 * width, 8 * width, width))
        return SegmenterNetwork(network, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), returns_dict=False)
    if architecture == "deeplabv3-resnet101":
        return SegmenterNetwork(_deeplabv3_resnet101(num_classes, pretrained), IMAGENET_MEAN, IMAGENET_STD, returns_dict=True)
    raise ValueError(f"unknown segmenter architecture {architecture!r}; choose one of {ARCHITECTURES}")


def _deeplabv3_resnet101(num_classes: int, pretrained: bool) -> torch.nn.Module:
    try:
        from torchvision.models import ResNet101_Weights
        from torchvision.models.segmentation import deeplabv3_resnet101
    except (ImportError, RuntimeError) as error:
        raise ValueError(
            "the deeplabv3-resnet101 segmenter needs torchvision built for the installed torch "
            f"{torch.__version__} ({type(error).__name__}: {str(error).strip()[:120]}); install the matching "
            "torchvision, or choose --architecture unet"
        ) from None
    weights = ResNet101_Weights.IMAGENET1K_V1 if pretrained else None
    try:
        return deeplabv3_resnet101(weights=None, weights_backbone=weights, num_classes=num_classes, aux_loss=False)
    except (OSError, RuntimeError) as error:  # urllib's URLError is an OSError
        raise ValueError(
            f"the deeplabv3-resnet101 segmenter starts from ImageNet weights ({weights.url}), which could not be "
            f"loaded: {str(error).strip()[:160]}; on a machine without network, put that file into "
            f"{torch.hub.get_dir()}/checkpoints/ first, or choose --architecture unet"
        ) from None
