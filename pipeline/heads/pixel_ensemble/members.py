"""Training the ensemble's members as the paper's official code does (paper protocol), or fused (fast)."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.config import TrainSettings
from pipeline.heads.pixel_ensemble.ensemble import Ensemble, MemberLog, make_pixel_classifier
from pipeline.store.schema import FeatureDescription

logger = logging.getLogger(__name__)


def run_epochs(
    epoch_batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    train_step: Callable[[torch.Tensor, torch.Tensor], float | None],
    settings: TrainSettings,
    show_progress: bool = False,
) -> MemberLog:
    """The paper's epoch loop and stopping rule around any training step.

    Up to `max_epochs` epochs. From epoch `patience_from_epoch` on, every step whose batch
    loss is not a new best counts; a new best resets the count; training stops once the count
    exceeds `patience`.

    Args:
        epoch_batches: epoch index → an iterable of (features, labels) batches.
        train_step: takes one batch, updates the model, returns its loss (None: batch skipped).
        settings: epochs and stopping rule.
        show_progress: show a progress bar over epochs.
    """
    log = MemberLog()
    best_loss, steps_without_best = float("inf"), 0
    for epoch in tqdm(range(settings.max_epochs), desc="train", unit="epoch", disable=not show_progress):
        losses = []
        for features, labels in epoch_batches(epoch):
            loss_value = train_step(features, labels)
            if loss_value is None:
                continue
            losses.append(loss_value)
            log.iterations += 1
            if epoch >= settings.patience_from_epoch:
                if loss_value < best_loss:
                    best_loss, steps_without_best = loss_value, 0
                else:
                    steps_without_best += 1
                if steps_without_best > settings.patience:
                    log.stopped_early = True
                    break
        log.epochs = epoch + 1
        log.epoch_mean_loss.append(float(np.mean(losses)) if losses else float("nan"))
        if log.stopped_early:
            break
    return log


def train_member(
    model: torch.nn.Module,
    epoch_batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    settings: TrainSettings,
    device: torch.device = torch.device("cpu"),
) -> MemberLog:
    """Trains one member with the paper's protocol: Adam, cross-entropy, `run_epochs`' rule.

    Args:
        model: the member, on `device`.
        epoch_batches: epoch index → an iterable of (features (B, D), labels (B,)) batches.
        settings: learning rate, epochs and stopping rule.
        device: where the member trains.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    criterion = torch.nn.CrossEntropyLoss()

    def train_step(features: torch.Tensor, labels: torch.Tensor) -> float | None:
        if len(labels) < settings.batch_size:  # the official DataLoader drops the last, short batch
            return None
        optimizer.zero_grad()
        loss = criterion(model(features.to(device)), labels.to(device))
        loss.backward()
        optimizer.step()
        return loss.item()

    model.train()
    log = run_epochs(epoch_batches, train_step, settings)
    model.eval()
    return log


class FusedMembers(torch.nn.Module):
    """M members of the paper's architecture computed together as batched matrix products.

    Member m's batch is features[m]; its layers are slices [m] of the stacked weights, and its
    BatchNorm statistics are its own (one BatchNorm over M·width channels). The loss is the sum
    of the members' losses, so every member's gradient is what it would be alone.
    """

    def __init__(self, members: list[torch.nn.Sequential]):
        super().__init__()
        linears = [[layer for layer in member if isinstance(layer, torch.nn.Linear)] for member in members]
        self.count = len(members)
        self.weights = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.stack([m[k].weight.detach().T for m in linears])) for k in range(3)]
        )  # each (M, in, out)
        self.biases = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.stack([m[k].bias.detach() for m in linears])[:, None, :]) for k in range(3)]
        )  # each (M, 1, out)
        self.widths = [linears[0][0].out_features, linears[0][1].out_features]
        self.norms = torch.nn.ModuleList([torch.nn.BatchNorm1d(self.count * width) for width in self.widths])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (M, B, D) → logits (M, B, K)."""
        hidden = features
        for layer in range(2):
            hidden = torch.relu(torch.baddbmm(self.biases[layer], hidden, self.weights[layer]))  # (M, B, W)
            members, batch, width = hidden.shape
            flat = hidden.permute(1, 0, 2).reshape(batch, members * width)  # (B, M·W): member-major channels
            hidden = self.norms[layer](flat).reshape(batch, members, width).permute(1, 0, 2)
        return torch.baddbmm(self.biases[2], hidden, self.weights[2])

    def unfuse(self, feature_dim: int, num_classes: int) -> list[torch.nn.Sequential]:
        """The members as separate `make_pixel_classifier` modules (eval mode)."""
        members = []
        for m in range(self.count):
            model = make_pixel_classifier(feature_dim, num_classes, torch.Generator(), self.widths)
            linears = [layer for layer in model if isinstance(layer, torch.nn.Linear)]
            norms = [layer for layer in model if isinstance(layer, torch.nn.BatchNorm1d)]
            with torch.no_grad():
                for k, linear in enumerate(linears):
                    linear.weight.copy_(self.weights[k][m].T)
                    linear.bias.copy_(self.biases[k][m, 0])
                for fused, norm in zip(self.norms, norms):
                    width = norm.num_features
                    part = slice(m * width, (m + 1) * width)
                    norm.weight.copy_(fused.weight[part])
                    norm.bias.copy_(fused.bias[part])
                    norm.running_mean.copy_(fused.running_mean[part])
                    norm.running_var.copy_(fused.running_var[part])
                    norm.num_batches_tracked.copy_(fused.num_batches_tracked)
            members.append(model.eval())
        return members


def fast_schedule_steps(settings: TrainSettings, training_pixels: int) -> int:
    """Fused optimiser steps of the fast protocol: `fast_epochs` passes over the pixels, and at
    least `fast_min_steps`.

    The floor matters for small images: 20 labeled 32×32 images make 1.5 passes only 120 steps,
    too few for the MLPs to learn parts that cover 1 % of the pixels (demo brows: validation IoU
    0.06–0.13 without the floor, 0.47–0.48 with it; bench/results/fast_protocol_classes.json),
    where 256×256 images give thousands.
    """
    passes = math.ceil(settings.fast_epochs * training_pixels / settings.fast_batch_size)
    return max(1, passes, settings.fast_min_steps)


def train_fused(
    epoch_batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    feature_dim: int,
    num_classes: int,
    training_pixels: int,
    settings: TrainSettings,
    device: torch.device = torch.device("cpu"),
    show_progress: bool = True,
) -> tuple[list[torch.nn.Sequential], list[MemberLog]]:
    """The fast protocol: all members at once, a fixed budget of passes over the pixels.

    Each step trains every member on its own `fast_batch_size` pixels. Adam starts at
    `fast_learning_rate` (by default 6e-3: 1.5× the paper's rate scaled with the batch,
    1e-3 × 256 / 64) and decays linearly to 0 over `fast_epochs` passes, so training ends at a
    fixed sample budget instead of the paper's noise-driven stopping rule (which needs ≥ 5
    epochs; measured in bench/results/training_speed.json, 1.5 passes reach the same mIoU
    within half a point on the demo and cat_15).

    Args:
        epoch_batches: epoch → (features (M, B, D), labels (M, B)) batches.
        feature_dim, num_classes: the members' input and output widths.
        training_pixels: pixels per epoch (sets the step budget).
        settings: members, seed, fast_* settings.
    """
    # Fused straight away: the separate members' weights are not kept beside the stacked copy.
    fused = FusedMembers(
        [
            make_pixel_classifier(
                feature_dim, num_classes, torch.Generator().manual_seed(settings.seed * 1000 + m), settings.hidden_widths
            )
            for m in range(settings.members)
        ]
    ).to(device)
    optimizer = torch.optim.Adam(fused.parameters(), lr=settings.fast_learning_rate, fused=device.type in ("cpu", "cuda"))
    total_steps = fast_schedule_steps(settings, training_pixels)
    # Linear decay to 0 at the last step.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total_steps))
    log = MemberLog()
    fused.train()
    with tqdm(total=total_steps, desc="train (fast)", unit="step", disable=not show_progress) as progress:
        while log.iterations < total_steps:
            losses = []
            for features, labels in epoch_batches(log.epochs):
                if labels.shape[1] < 2:  # BatchNorm cannot train on a single pixel
                    continue
                features, labels = features.to(device), labels.to(device)
                optimizer.zero_grad()
                logits = fused(features)  # (M, B, K)
                per_member = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, num_classes), labels.reshape(-1), reduction="none"
                ).reshape(labels.shape).mean(dim=1)  # (M,)
                per_member.sum().backward()  # each member's gradient is its own loss's
                optimizer.step()
                schedule.step()
                losses.append(per_member.mean().item())
                log.iterations += 1
                progress.update(1)
                if log.iterations >= total_steps:
                    break
            log.epochs += 1
            log.epoch_mean_loss.append(float(np.mean(losses)) if losses else float("nan"))
            if not losses:
                break
    fused.eval()
    return fused.cpu().unfuse(feature_dim, num_classes), [dataclasses.replace(log) for _ in range(settings.members)]


def train_ensemble(
    epoch_batches: Callable[[int, int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    feature_dim: int,
    class_names: list[str],
    ignore_label: int,
    features: FeatureDescription,
    settings: TrainSettings,
    device: torch.device = torch.device("cpu"),
    show_progress: bool = True,
) -> Ensemble:
    """Trains `settings.members` independent members, one after the other.

    Args:
        epoch_batches: (member, epoch) → that member's batches for that epoch; members should
            see different pixel orders.
        feature_dim, class_names, ignore_label, features: recorded in the ensemble.
        settings: the training settings.
        device: where the members train.
        show_progress: show a progress bar over members.
    """
    members, logs = [], []
    for member in tqdm(range(settings.members), desc="train", unit="member", disable=not show_progress):
        generator = torch.Generator().manual_seed(settings.seed * 1000 + member)
        model = make_pixel_classifier(feature_dim, len(class_names), generator, settings.hidden_widths).to(device)
        log = train_member(model, lambda epoch: epoch_batches(member, epoch), settings, device)
        logger.info(
            "member %d: %d epochs, %d iterations, last epoch loss %.4f%s",
            member, log.epochs, log.iterations, log.epoch_mean_loss[-1], " (stopped early)" if log.stopped_early else "",
        )
        members.append(model.cpu())
        logs.append(log)
    return Ensemble(members, feature_dim, list(class_names), ignore_label, features, logs)

