"""Protocol parity: the default ("paper") protocol behaves as the official implementation
(NOTES.md; yandex-research/ddpm-segmentation, train_interpreter.py and src/pixel_classifier.py),
point by point. Each test states the official behaviour as a small independent oracle and checks
our code against it: what is sampled, initialisation, optimiser, batches, stopping rule, voting,
uncertainty and IoU accumulation. (Data order and resizing are pinned in test_folders.py.)
"""

import copy

import numpy as np
import pytest
import torch

from conftest import write_synthetic_store
from pipeline.config import TrainSettings
from pipeline.heads.pixel_ensemble.ensemble import make_pixel_classifier
from pipeline.heads.pixel_ensemble.inference import predict_with_uncertainty
from pipeline.heads.pixel_ensemble.members import run_epochs, train_member
from pipeline.heads.pixel_ensemble.sampling import PixelStream, select_labeled_pixels
from pipeline.metrics import IoUAccumulator, top_decile_mean
from pipeline.store.reader import FeatureStore

# --- what is sampled ---------------------------------------------------------------------------

def official_training_pixels(label_maps, num_classes, ignore_label):
    """The official rule: per image, a class (not the ignore label) with 0 < count < 20 pixels
    becomes the ignore label; then every pixel whose label is not the ignore label is used."""
    chosen = set()
    for image, labels in enumerate(label_maps):
        labels = labels.copy()
        for target in range(num_classes):
            if target != ignore_label and 0 < (labels == target).sum() < 20:
                labels[labels == target] = ignore_label
        chosen |= {(image, y, x, int(labels[y, x])) for y, x in zip(*np.nonzero(labels != ignore_label))}
    return chosen


@pytest.mark.parametrize("ignore_label", [255, 0])
def test_every_usable_labeled_pixel_is_sampled_and_nothing_else(tmp_path, ignore_label):
    rng = np.random.default_rng(0)
    label_maps = []
    for _ in range(3):
        labels = rng.choice([0, 1, 2, 255], size=(16, 16), p=[0.5, 0.3, 0.1, 0.1]).astype(np.int64)
        labels[0, :12] = 2  # at least 12 pixels of class 2; sometimes fewer than 20 in all
        label_maps.append(labels)
    label_maps[1][label_maps[1] == 2] = 1
    label_maps[1][0, :5] = 2  # 5 pixels: a rare class in this image only
    if ignore_label == 0:
        label_maps = [np.where(labels == 255, 0, labels) for labels in label_maps]
    write_synthetic_store(tmp_path / "store.zarr", "native", label_maps)
    pixels = select_labeled_pixels(FeatureStore(tmp_path / "store.zarr"), 3, ignore_label, min_class_pixels=20)
    ours = set(zip(pixels.image_index.tolist(), pixels.y.tolist(), pixels.x.tolist(), pixels.label.tolist()))
    assert len(ours) == len(pixels)
    assert ours == official_training_pixels(label_maps, 3, ignore_label)
    assert ignore_label not in set(pixels.label.tolist())


# --- initialisation and architecture --------------------------------------------------------------

@pytest.mark.parametrize("num_classes, widths", [(29, (128, 32)), (30, (256, 128))])
def test_members_have_the_official_layers_and_initialisation(num_classes, widths):
    model = make_pixel_classifier(2000, num_classes, torch.Generator().manual_seed(0))
    kinds = [type(layer).__name__ for layer in model]
    assert kinds == ["Linear", "ReLU", "BatchNorm1d", "Linear", "ReLU", "BatchNorm1d", "Linear"]
    linears = [model[0], model[3], model[6]]
    assert [(layer.in_features, layer.out_features) for layer in linears] == [
        (2000, widths[0]), (widths[0], widths[1]), (widths[1], num_classes)
    ]
    first = linears[0].weight.detach()
    assert abs(first.mean().item()) < 1e-3 and first.std().item() == pytest.approx(0.02, rel=0.02)  # normal(0, 0.02)
    assert all((layer.bias == 0).all() for layer in linears)
    for norm in (model[2], model[5]):  # BatchNorm1d keeps PyTorch's defaults (the official init only touches 2d)
        assert (norm.weight == 1).all() and (norm.bias == 0).all() and norm.momentum == 0.1 and norm.eps == 1e-5


# --- optimiser and loss ---------------------------------------------------------------------------

def test_a_training_step_is_adam_at_1e_3_on_mean_cross_entropy():
    generator = torch.Generator().manual_seed(1)
    features, labels = torch.randn(64, 12, generator=generator), torch.randint(0, 5, (64,), generator=generator)
    ours = make_pixel_classifier(12, 5, torch.Generator().manual_seed(0))
    reference = copy.deepcopy(ours)
    settings = TrainSettings(max_epochs=3, batch_size=64)
    log = train_member(ours, lambda epoch: [(features, labels)], settings)
    optimizer = torch.optim.Adam(reference.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)
    reference.train()
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(reference(features), labels, reduction="mean")
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    for mine, theirs in zip(ours.state_dict().values(), reference.state_dict().values()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    assert log.iterations == 3 and log.epoch_mean_loss == pytest.approx(losses, rel=1e-5)
    assert not ours.training  # members are used in eval mode (BatchNorm running statistics)


# --- batches --------------------------------------------------------------------------------------

def test_an_epoch_is_whole_batches_of_64_in_a_fresh_order_and_the_short_last_batch_is_dropped(tmp_path):
    labels = np.full((16, 16), 255, dtype=np.int64)
    labels[:12, :] = np.arange(16) % 3  # 192 labeled pixels per image
    write_synthetic_store(tmp_path / "store.zarr", "native", [labels, labels[::-1].copy()])
    store = FeatureStore(tmp_path / "store.zarr")
    pixels = select_labeled_pixels(store, 3, 255)
    assert len(pixels) == 384
    pixels = type(pixels)(*(column[:350] for column in (pixels.image_index, pixels.y, pixels.x, pixels.label)))
    # A buffer that is not a multiple of the batch still gives whole batches until the last.
    stream = PixelStream(store, pixels, batch_size=64, buffer_pixels=100)
    orders = []
    for epoch in range(2):
        sizes, seen = [], []
        for features, batch_labels in stream.batches(np.random.default_rng([0, 0, epoch])):
            sizes.append(len(batch_labels))
            seen.append(features[:, 0].numpy())
        assert sizes == [64] * 5 + [350 - 320]
        orders.append(np.concatenate(seen))
    assert not np.array_equal(orders[0], orders[1])  # reshuffled every epoch (DataLoader shuffle=True)
    settings = TrainSettings(max_epochs=2, batch_size=64, patience_from_epoch=100)
    model = make_pixel_classifier(store.feature_dim, 3, torch.Generator().manual_seed(0))
    log = train_member(model, lambda epoch: stream.batches(np.random.default_rng(epoch)), settings)
    assert log.iterations == 2 * (350 // 64)  # drop_last=True: the 30-pixel batch never trains


# --- stopping rule --------------------------------------------------------------------------------

def official_iterations(losses_per_epoch):
    """The official loop: up to 100 epochs; from epoch index 4 on, a batch loss that is not a new
    best adds one to a count that a new best resets; stop as soon as the count exceeds 50."""
    iterations, count, best = 0, 0, 10_000_000.0
    for epoch, losses in enumerate(losses_per_epoch[:100]):
        for loss in losses:
            iterations += 1
            if epoch > 3:
                best, count = (loss, 0) if loss < best else (best, count + 1)
                if count > 50:
                    return iterations, epoch + 1, True
    return iterations, min(len(losses_per_epoch), 100), False


@pytest.mark.parametrize("seed", range(6))
def test_the_stopping_rule_stops_at_the_same_iteration(seed):
    rng = np.random.default_rng(seed)
    batches = int(rng.integers(5, 40))
    trend = np.linspace(2.0, 2.0 - rng.uniform(0, 1.5), 110 * batches)  # slowly improving, then noise decides
    losses = (trend + rng.normal(0, rng.uniform(0.01, 0.3), trend.size)).reshape(110, batches).tolist()
    settings = TrainSettings()  # the paper's: 100 epochs, patience 50 from epoch 4
    scripted = iter(value for epoch in losses for value in epoch)
    batches_of = lambda epoch: ((None, None) for _ in range(batches))
    log = run_epochs(batches_of, lambda features, labels: next(scripted), settings)
    assert (log.iterations, log.epochs, log.stopped_early) == official_iterations(losses)


def test_constant_loss_stops_52_steps_into_epoch_4():
    log = run_epochs(lambda epoch: [(None, None)] * 10, lambda features, labels: 1.0, TrainSettings())
    # epochs 0-3: 40 steps uncounted; epoch 4 step 1 is the first best; 51 more without one.
    assert (log.iterations, log.epochs, log.stopped_early) == (40 + 52, 10, True)


# --- voting and uncertainty -------------------------------------------------------------------------

class _FixedLogits(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, features):
        return self.logits


def test_the_label_is_the_mode_of_the_members_argmax_votes_ties_to_the_smallest():
    votes = torch.tensor([[2, 2, 1, 1], [0, 3, 3, 1], [4, 4, 4, 0]])  # (P, M)
    members = [_FixedLogits(torch.nn.functional.one_hot(votes[:, m], 5).float() * 3.0) for m in range(4)]
    labels, _ = predict_with_uncertainty(members, torch.zeros(3, 1))
    assert labels.tolist() == [1, 3, 4]
    generator = torch.Generator().manual_seed(0)
    members = [_FixedLogits(torch.randn(500, 6, generator=generator)) for _ in range(10)]
    labels, _ = predict_with_uncertainty(members, torch.zeros(500, 1))
    official = torch.mode(torch.stack([member.logits.log_softmax(1).max(1)[1] for member in members], dim=-1), 1)[0]
    assert torch.equal(labels, official)


@pytest.mark.parametrize("pixels", [7, 1000])
def test_uncertainty_is_jensen_shannon_averaged_over_the_top_tenth(pixels):
    generator = torch.Generator().manual_seed(pixels)
    members = [_FixedLogits(2 * torch.randn(pixels, 8, generator=generator)) for _ in range(10)]
    _, disagreement = predict_with_uncertainty(members, torch.zeros(pixels, 1))
    distributions = torch.distributions
    mean_probabilities = torch.stack([member.logits.softmax(1) for member in members]).mean(0)
    member_entropy = torch.stack([distributions.Categorical(logits=member.logits).entropy() for member in members])
    js = distributions.Categorical(mean_probabilities).entropy() - member_entropy.mean(0)
    torch.testing.assert_close(disagreement, js.clamp_min(0), atol=2e-6, rtol=1e-5)
    official_score = js.sort()[0][-int(js.shape[0] / 10):].mean().item()  # [-0:] is every pixel
    assert top_decile_mean(disagreement.numpy()) == pytest.approx(official_score, abs=1e-5)


# --- IoU accumulation ------------------------------------------------------------------------------

def official_miou(predictions, targets, num_classes, ignore_label):
    """The official metric: per class (not the ignore label), intersections and unions of
    pred == k and gt == k summed over all pixels of all images; IoU = ∩ / (1e-8 + ∪); mean."""
    ious = []
    for k in range(num_classes):
        if k == ignore_label:
            continue
        intersection = sum(((p == k) & (g == k)).sum() for p, g in zip(predictions, targets))
        union = sum(((p == k) | (g == k)).sum() for p, g in zip(predictions, targets))
        ious.append(intersection / (1e-8 + union))
    return float(np.mean(ious)), ious


@pytest.mark.parametrize("ignore_label", [255, 0])
def test_miou_is_the_official_one(ignore_label):
    rng = np.random.default_rng(ignore_label)
    predictions = [rng.integers(0, 5, (12, 12)) for _ in range(4)]  # class 5 is never predicted
    targets = [rng.choice([0, 1, 2, 3, 255], size=(12, 12)) for _ in range(4)]  # 4 and 5 are never true
    if ignore_label == 0:
        targets = [np.where(target == 255, 0, target) for target in targets]
    accumulator = IoUAccumulator(6, ignore_label)
    for prediction, target in zip(predictions, targets):
        accumulator.update(prediction, target)
    official, per_class = official_miou(predictions, targets, 6, ignore_label)
    assert accumulator.mean_iou("paper") == pytest.approx(official, abs=1e-7)
    ours = accumulator.per_class_iou("paper")
    np.testing.assert_allclose(ours[accumulator.scored_classes()], per_class, atol=1e-7)
    assert accumulator.mean_iou("ignore_excluded") != pytest.approx(official)  # the definitions differ here
