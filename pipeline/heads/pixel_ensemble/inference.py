"""The ensemble's predictions: mean probabilities, votes and disagreement, at native resolution."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pipeline.sizes import as_shape

logger = logging.getLogger(__name__)


@torch.inference_mode()
def predict_with_uncertainty(members: list[torch.nn.Module], features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ensemble's label and disagreement for each pixel.

    Args:
        members: trained members in eval mode.
        features: float32 (P, D).

    Returns:
        labels int64 (P,): the mode of the members' argmax votes (ties: the smallest label);
        jensen_shannon float32 (P,): entropy of the mean softmax minus the mean member entropy (≥ 0).
    """
    logits = torch.stack([member(features) for member in members])  # (M, P, K)
    return votes_and_disagreement(logits)


def votes_and_disagreement(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ensemble's labels and Jensen–Shannon disagreement from its members' logits (M, P, K).

    Returns the same pair as `predict_with_uncertainty`.
    """
    votes = logits.argmax(dim=2).T  # (P, M)
    labels = torch.mode(votes, dim=1).values
    probabilities = logits.softmax(dim=2)
    member_entropy = -(probabilities * logits.log_softmax(dim=2)).sum(dim=2)  # (M, P)
    mean_probabilities = probabilities.mean(dim=0)  # (P, K)
    mean_entropy = -(mean_probabilities * mean_probabilities.clamp_min(1e-30).log()).sum(dim=1)
    # Non-negative in exact arithmetic; clamp float round-off.
    return labels, (mean_entropy - member_entropy.mean(dim=0)).clamp_min(0.0)


def predict_from_block_tables(
    members: list[torch.nn.Module], tables: list[torch.Tensor], size: int | Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """`predict_with_uncertainty` for every pixel of an image of `size` (S: S×S, or (H, W)),
    from its block tables: labels int64 (H·W,) and disagreement float32 (H·W,), row-major."""
    return votes_and_disagreement(member_logits_from_tables(members, tables, size))


@torch.inference_mode()
def member_logits_from_tables(
    members: list[torch.nn.Module], tables: list[torch.Tensor], size: int | Sequence[int]
) -> torch.Tensor:
    """Each member's logits for every pixel of an image, from its block tables.

    A pixel's features are the blocks upsampled bilinearly and concatenated, and upsampling
    is linear, so each member's first layer is applied at every block's own resolution and
    upsampled after: W·up(f) = Σ_b up(W_b·f_b), and blocks of one resolution are summed before
    one upsampling. Each member upsamples its first layer's 128 (or 256) channels instead of
    the D features (8448 at the paper's shape), and its BatchNorms are folded into the next
    layers. The result equals predicting from the full feature vectors up to float round-off
    (bench/results/inference_speed.json: the same labels, 6.7× faster at the paper's shape).

    Args:
        members: trained members in eval mode (`make_pixel_classifier`'s layers).
        tables: per (step, block) in feature order, (C_b, h_b, w_b), any float dtype.
        size: the image size: S (S×S) or (H, W).

    Returns:
        float32 (M, H·W, K), pixels row-major.
    """
    height, width = as_shape(size)
    tables = [table.float() for table in tables]
    widths = [table.shape[0] for table in tables]
    first_weights = torch.cat([member[0].weight for member in members])  # (M·H1, D): all members at once
    # Tables of one resolution are summed there and upsampled once: up(a) + up(b) = up(a + b).
    native: dict[tuple[int, int], torch.Tensor] = {}
    for weight, table in zip(torch.split(first_weights, widths, dim=1), tables):  # weight (M·H1, C_b)
        product = torch.einsum("oc,chw->ohw", weight, table)  # (M·H1, h_b, w_b)
        resolution = tuple(table.shape[1:])
        native[resolution] = product if resolution not in native else native[resolution].add_(product)
    # The biases join the first sum: upsampling keeps a constant constant.
    first_resolution = next(iter(native))
    native[first_resolution] += torch.cat([member[0].bias for member in members])[:, None, None]
    member_logits = []
    for index, member in enumerate(members):
        rows = slice(index * member[0].out_features, (index + 1) * member[0].out_features)
        hidden = None  # (H·W, H1): pixels first, so the upsampling runs channels-last (~1.7x faster)
        for summed in native.values():  # (M·H1, h, w)
            channels_last = summed[None, rows].contiguous(memory_format=torch.channels_last)
            upsampled = F.interpolate(channels_last, size=(height, width), mode="bilinear", align_corners=False)
            upsampled = upsampled.permute(0, 2, 3, 1).reshape(height * width, -1)  # (1, H1, H, W) -> (H·W, H1), no copy
            hidden = upsampled if hidden is None else hidden.add_(upsampled)
        for weight, bias in _folded_hidden_layers(member):
            hidden = torch.addmm(bias, hidden.relu_(), weight.T)  # ReLU, then (BatchNorm + Linear) folded
        member_logits.append(hidden)  # (H·W, K)
    return torch.stack(member_logits)  # (M, H·W, K)


def _folded_hidden_layers(member: torch.nn.Sequential) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A member's BatchNorm → Linear pairs (eval mode) as single affine maps (weight (out, in), bias (out,)).

    BatchNorm in eval mode is x·scale + shift per channel, so Linear(BatchNorm(x)) =
    (W·diag(scale))·x + (W·shift + b): the same numbers without the BatchNorm pass.
    """
    folded = []
    for norm, linear in ((member[2], member[3]), (member[5], member[6])):
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)  # (in,)
        shift = norm.bias - norm.running_mean * scale
        folded.append((linear.weight * scale, linear.bias + linear.weight @ shift))
    return folded

