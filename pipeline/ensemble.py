"""The ensemble of small pixel MLPs, trained and used as the paper's official code does."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from pipeline.atomic import replaced_folder
from pipeline.config import TrainSettings

logger = logging.getLogger(__name__)

ENSEMBLE_CONFIG = "ensemble.json"
ENSEMBLE_WEIGHTS = "members.safetensors"


def hidden_widths(num_classes: int) -> tuple[int, int]:
    """The paper's hidden layer widths: (128, 32) below 30 classes, (256, 128) from 30 on."""
    return (128, 32) if num_classes < 30 else (256, 128)


def make_pixel_classifier(feature_dim: int, num_classes: int, generator: torch.Generator) -> torch.nn.Sequential:
    """One member: Linear → ReLU → BatchNorm → Linear → ReLU → BatchNorm → Linear.

    Linear weights are drawn from N(0, 0.02) with `generator`, biases are 0 and the BatchNorm
    layers keep PyTorch's defaults, as in the official implementation.
    """
    first, second = hidden_widths(num_classes)
    model = torch.nn.Sequential(
        torch.nn.Linear(feature_dim, first),
        torch.nn.ReLU(),
        torch.nn.BatchNorm1d(first),
        torch.nn.Linear(first, second),
        torch.nn.ReLU(),
        torch.nn.BatchNorm1d(second),
        torch.nn.Linear(second, num_classes),
    )
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            with torch.no_grad():
                layer.weight.normal_(0.0, 0.02, generator=generator)
                layer.bias.zero_()
    return model


@dataclasses.dataclass
class MemberLog:
    """How one member's training went."""

    epochs: int = 0
    iterations: int = 0
    stopped_early: bool = False
    epoch_mean_loss: list[float] = dataclasses.field(default_factory=list)


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
        widths = [linears[0][0].out_features, linears[0][1].out_features]
        self.norms = torch.nn.ModuleList([torch.nn.BatchNorm1d(self.count * width) for width in widths])

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
            model = make_pixel_classifier(feature_dim, num_classes, torch.Generator())
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
            make_pixel_classifier(feature_dim, num_classes, torch.Generator().manual_seed(settings.seed * 1000 + m))
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


@dataclasses.dataclass
class Ensemble:
    """Trained members with what they need to be used and checked later.

    Attributes:
        members: the MLPs, in eval mode.
        feature_dim: D, the pixel feature width they expect.
        class_names: K names; label k is class_names[k].
        ignore_label: the label of unannotated pixels.
        features: what the features were: steps, blocks, checkpoint_sha256, image_size, noise_seed.
        logs: one MemberLog per member.
    """

    members: list[torch.nn.Module]
    feature_dim: int
    class_names: list[str]
    ignore_label: int
    features: dict
    logs: list[MemberLog]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def train_ensemble(
    epoch_batches: Callable[[int, int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    feature_dim: int,
    class_names: list[str],
    ignore_label: int,
    features: dict,
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
        model = make_pixel_classifier(feature_dim, len(class_names), generator).to(device)
        log = train_member(model, lambda epoch: epoch_batches(member, epoch), settings, device)
        logger.info(
            "member %d: %d epochs, %d iterations, last epoch loss %.4f%s",
            member, log.epochs, log.iterations, log.epoch_mean_loss[-1], " (stopped early)" if log.stopped_early else "",
        )
        members.append(model.cpu())
        logs.append(log)
    return Ensemble(members, feature_dim, list(class_names), ignore_label, dict(features), logs)


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


@torch.inference_mode()
def predict_from_block_tables(
    members: list[torch.nn.Module], tables: list[torch.Tensor], size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`predict_with_uncertainty` for every pixel of a size×size image, from its block tables.

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
        size: the image side.

    Returns:
        labels int64 (size·size,) and disagreement float32 (size·size,), row-major.
    """
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
        hidden = None  # (S·S, H1): pixels first, so the upsampling runs channels-last (~1.7x faster)
        for summed in native.values():  # (M·H1, h, w)
            channels_last = summed[None, rows].contiguous(memory_format=torch.channels_last)
            upsampled = F.interpolate(channels_last, size=(size, size), mode="bilinear", align_corners=False)
            upsampled = upsampled.permute(0, 2, 3, 1).reshape(size * size, -1)  # (1, H1, S, S) -> (S·S, H1), no copy
            hidden = upsampled if hidden is None else hidden.add_(upsampled)
        for weight, bias in _folded_hidden_layers(member):
            hidden = torch.addmm(bias, hidden.relu_(), weight.T)  # ReLU, then (BatchNorm + Linear) folded
        member_logits.append(hidden)  # (S·S, K)
    return votes_and_disagreement(torch.stack(member_logits))  # (M, S·S, K)


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


def save_ensemble(ensemble: Ensemble, out_dir: str | Path) -> None:
    """Writes `ensemble.json` and `members.safetensors` into `out_dir`, atomically: a reader
    sees the old ensemble or the new one, never half of one."""
    tensors = {
        f"member_{index}.{name}": tensor.detach().cpu().contiguous()
        for index, member in enumerate(ensemble.members)
        for name, tensor in member.state_dict().items()
    }
    config = {
        "members": len(ensemble.members),
        "feature_dim": ensemble.feature_dim,
        "hidden_widths": list(hidden_widths(ensemble.num_classes)),
        "class_names": ensemble.class_names,
        "ignore_label": ensemble.ignore_label,
        "features": ensemble.features,
        "logs": [dataclasses.asdict(log) for log in ensemble.logs],
    }
    with replaced_folder(Path(out_dir)) as staging:
        save_file(tensors, staging / ENSEMBLE_WEIGHTS)
        (staging / ENSEMBLE_CONFIG).write_text(json.dumps(config, indent=1))


def load_ensemble(ensemble_dir: str | Path) -> Ensemble:
    """Reads an ensemble written by `save_ensemble`.

    Raises:
        FileNotFoundError: when the folder has no ensemble.
        ValueError: when its files do not fit together.
    """
    ensemble_dir = Path(ensemble_dir)
    config_path, weights_path = ensemble_dir / ENSEMBLE_CONFIG, ensemble_dir / ENSEMBLE_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"no trained ensemble in {ensemble_dir} (expected {ENSEMBLE_CONFIG} and {ENSEMBLE_WEIGHTS})")
    config = json.loads(config_path.read_text())
    tensors = load_file(weights_path)
    members = []
    for index in range(config["members"]):
        model = make_pixel_classifier(config["feature_dim"], len(config["class_names"]), torch.Generator())
        prefix = f"member_{index}."
        state = {name[len(prefix) :]: tensor for name, tensor in tensors.items() if name.startswith(prefix)}
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            raise ValueError(f"{weights_path}: member {index} does not match {config_path}: {error}") from None
        members.append(model.eval())
    logs = [MemberLog(**log) for log in config["logs"]]
    return Ensemble(members, config["feature_dim"], config["class_names"], config["ignore_label"], config["features"], logs)
