"""Pixel features from block activations: the paper's bilinear upsampling, whole or per pixel.

Upsampling is `F.interpolate(mode="bilinear", align_corners=False)` to the image size, as in
the paper. Because it is linear, one pixel's value needs only the 4 neighbouring activations of
each block; `gather_pixels` computes exactly that, so a store can keep blocks at their own
resolution and make any pixel's full feature vector on demand.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pipeline.sizes import as_shape


def upsample_and_concatenate(activations: Sequence[torch.Tensor], size: int | Sequence[int]) -> torch.Tensor:
    """Upsamples every block to the image size and concatenates them along channels.

    Args:
        activations: per block (in feature order) a tensor (B, C_b, h_b, w_b).
        size: the image size: S (S×S) or (H, W).

    Returns:
        float tensor (B, H, W, ΣC_b), channels last.
    """
    upsampled = [
        F.interpolate(block.float(), size=as_shape(size), mode="bilinear", align_corners=False)
        for block in activations
    ]
    return torch.cat(upsampled, dim=1).permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C)


def _bilinear_taps(coordinates: torch.Tensor, in_size: int, out_size: int):
    """Source indices and weights along one axis, as align_corners=False defines them.

    Returns:
        (low index, high index, high weight), each shaped like `coordinates`.
    """
    scale = in_size / out_size
    source = ((coordinates.double() + 0.5) * scale - 0.5).clamp(min=0.0)
    low = source.floor().long().clamp(max=in_size - 1)
    high = (low + 1).clamp(max=in_size - 1)
    high_weight = (source - low.double()).float()
    return low, high, high_weight


def gather_pixels(table: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """One block's upsampled features at chosen pixels, without upsampling the whole block.

    Args:
        table: one image's block activations, (C, h, w), any float dtype.
        ys, xs: pixel rows and columns in the image, int (P,).
        size: the image size the block is upsampled to: S (S×S) or (H, W).

    Returns:
        float32 (P, C), equal to `upsample_and_concatenate([table[None]], size)[0, ys, xs]`
        up to float32 round-off.
    """
    channels, height, width = table.shape
    image_height, image_width = as_shape(size)
    y_low, y_high, y_weight = _bilinear_taps(ys, height, image_height)
    x_low, x_high, x_weight = _bilinear_taps(xs, width, image_width)
    # Four neighbours per pixel as rows of the (h*w, C) table, and their bilinear weights.
    neighbours = torch.stack(
        [y_low * width + x_low, y_low * width + x_high, y_high * width + x_low, y_high * width + x_high], dim=1
    )  # (P, 4)
    weights = torch.stack(
        [
            (1 - y_weight) * (1 - x_weight),
            (1 - y_weight) * x_weight,
            y_weight * (1 - x_weight),
            y_weight * x_weight,
        ],
        dim=1,
    )  # (P, 4)
    # Row-major (h*w, C): embedding_bag on the transposed view is ~8x slower (measured). One
    # copy_ converts and transposes in a single pass (~8x faster than .float() then
    # .contiguous(), and one float32 temporary instead of two).
    rows = torch.empty(height * width, channels, dtype=torch.float32, device=table.device)
    rows.copy_(table.reshape(channels, height * width).T)  # (C, h*w) -> (h*w, C)
    return F.embedding_bag(neighbours, rows, per_sample_weights=weights, mode="sum")
