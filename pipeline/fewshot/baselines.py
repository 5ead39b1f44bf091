"""What in-context fine-tuning (DiffewS) has to beat, scored on the same episodes.

Both baselines read the frozen diffusion model's features (the paper's representation: the
image re-noised at a few steps, decoder blocks upsampled bilinearly to the image size and
concatenated) and learn nothing before the episode:

- **prototype**: each block's features are L2-normalised per pixel (so that every block weighs
  the same, whatever its scale), the supports' foreground and background pixels are averaged
  into two prototypes, and a query pixel is foreground where it is closer (cosine) to the
  foreground prototype. No threshold, nothing tuned: PANet's non-parametric rule.
- **ensemble**: the paper's method given the supports as its labeled images: the MLP ensemble
  (fast protocol: all members at once, a fixed budget of steps) trained per episode on the
  supports' pixels as foreground / background, then voting on the query's pixels.

The third baseline of the issue, DiffewS fine-tuned from random weights, is `train_fewshot` on a
randomly initialised copy of the checkpoint (`FewShotSettings.random_init`).

Features are computed once per image (at the episode size) and kept while they fit a memory
budget (least recently used first out): the demo's 64 test faces all stay, while a 512² image of
Stable Diffusion's features can take a gigabyte.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.config import ExtractSettings, TrainSettings
from pipeline.fewshot.episodes import Episode, EpisodeInputs
from pipeline.heads.pixel_ensemble.inference import votes_and_disagreement
from pipeline.heads.pixel_ensemble.members import train_fused
from pipeline.sources.loading import load_source

BASELINES = ("prototype", "ensemble")


class FeatureCache:
    """The frozen model's per-pixel features of episode images, computed once per image name
    and kept within `budget_bytes` (the least recently used dropped first).

    Each tap's map is upsampled bilinearly to the image size and L2-normalised per pixel; the
    taps are concatenated: float32 (D, H, W).
    """

    def __init__(self, checkpoint: str | Path, steps: Sequence[int], blocks: Sequence[int | str], seed: int,
                 device: str, budget_bytes: int = 2 << 30):
        # Any checkpoint `extract` reads: a pixel UNet, or a latent-diffusion folder (empty prompt).
        self.source = load_source(checkpoint, ExtractSettings(steps=list(steps), blocks=list(blocks), seed=seed,
                                                              device=device))
        self.budget_bytes = budget_bytes
        self._features: OrderedDict[str, torch.Tensor] = OrderedDict()

    def features(self, name: str, image: torch.Tensor) -> torch.Tensor:
        """Image float32 (3, H, W) in [-1, 1] → features float32 (D, H, W) (cached by `name`)."""
        if name in self._features:
            self._features.move_to_end(name)
            return self._features[name]
        features = self._compute(image)
        self._features[name] = features
        while sum(kept.nbytes for kept in self._features.values()) > self.budget_bytes and len(self._features) > 1:
            self._features.popitem(last=False)
        return features

    @torch.inference_mode()
    def _compute(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[1:]
        maps = self.source.feature_maps(image[None].to(self.source.device))  # tap → (1, T, C, h, w)
        parts = []
        for tap_maps in maps.values():
            steps = tap_maps[0].float()  # (T, C, h, w)
            upsampled = F.interpolate(steps, size=(height, width), mode="bilinear", align_corners=False)
            parts.append(F.normalize(upsampled, dim=1).flatten(0, 1))  # (T, C, H, W) -> (T·C, H, W)
        return torch.cat(parts).cpu()


def prototype_mask(query: torch.Tensor, supports: torch.Tensor, support_masks: torch.Tensor) -> torch.Tensor:
    """PANet's rule: foreground where a query pixel's cosine similarity to the supports'
    foreground mean exceeds that to their background mean.

    Args:
        query: features (D, H, W).
        supports: features (N, D, H, W).
        support_masks: float (N, H, W) in {0, 1}, each with at least one foreground pixel.

    Returns:
        bool (H, W).
    """
    foreground = support_masks[:, None]  # (N, 1, H, W)
    background = 1.0 - foreground
    prototypes = torch.stack([
        (supports * foreground).sum(dim=(0, 2, 3)) / foreground.sum().clamp_min(1.0),
        (supports * background).sum(dim=(0, 2, 3)) / background.sum().clamp_min(1.0),
    ])  # (2, D)
    similarity = torch.einsum("kd,dhw->khw", F.normalize(prototypes, dim=1), F.normalize(query, dim=0))  # (2, H, W)
    return similarity[0] > similarity[1]


def ensemble_mask(query: torch.Tensor, supports: torch.Tensor, support_masks: torch.Tensor,
                  settings: TrainSettings, seed: int) -> torch.Tensor:
    """The paper's MLP ensemble trained on the supports' pixels (foreground / background, fast
    protocol), voting on the query's pixels.

    Args:
        query: features (D, H, W); supports (N, D, H, W); support_masks float (N, H, W).
        settings: members, widths and the fast protocol's budget.
        seed: seeds the members' weights and the pixel order (the episode's number).

    Returns:
        bool (H, W).
    """
    dimensions = query.shape[0]
    # (N, D, H, W) -> (N·H·W, D), made contiguous: for one support the reshape is a strided view,
    # and gathering rows from it took 17 times as long (0.66 s an episode against 0.04)
    pixels = supports.permute(0, 2, 3, 1).reshape(-1, dimensions).contiguous()
    labels = support_masks.reshape(-1).long()  # (N·H·W,)
    members_settings = dataclasses.replace(settings, seed=seed)
    generator = torch.Generator().manual_seed(seed)

    def epoch_batches(epoch: int):
        # Each member its own order: (M, P) permutations, cut into batches of fast_batch_size.
        orders = torch.stack([torch.randperm(len(labels), generator=generator) for _ in range(settings.members)])
        for start in range(0, len(labels), settings.fast_batch_size):
            chosen = orders[:, start:start + settings.fast_batch_size]  # (M, B)
            yield pixels[chosen], labels[chosen]  # (M, B, D), (M, B)

    members, _ = train_fused(epoch_batches, dimensions, 2, len(labels), members_settings, show_progress=False)
    with torch.inference_mode():
        flat = query.reshape(dimensions, -1).T  # (D, H, W) -> (H·W, D)
        logits = torch.stack([member.eval()(flat) for member in members])  # (M, H·W, 2)
        votes, _ = votes_and_disagreement(logits)
    return votes.reshape(query.shape[1:]).bool()


def baseline_predictor(
    name: str, cache: FeatureCache, ensemble_settings: TrainSettings
) -> Callable[[int, Episode, EpisodeInputs], torch.Tensor]:
    """(episode number, episode, its inputs) → the baseline's predicted query mask, bool (H, W)."""
    if name not in BASELINES:
        raise ValueError(f"unknown few-shot baseline {name!r}: choose one of {', '.join(BASELINES)}")

    def predict(number: int, episode: Episode, inputs: EpisodeInputs) -> torch.Tensor:
        query = cache.features(episode.query, inputs.query_image)
        supports = torch.stack([cache.features(support, image)
                                for support, image in zip(episode.supports, inputs.support_images)])
        if name == "prototype":
            return prototype_mask(query, supports, inputs.support_masks)
        return ensemble_mask(query, supports, inputs.support_masks, ensemble_settings, seed=number)

    return predict
