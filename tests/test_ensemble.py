import dataclasses
import json

import pytest
import torch

from pipeline.config import TrainSettings
from pipeline.heads.pixel_ensemble.ensemble import (
    Ensemble,
    load_ensemble,
    make_pixel_classifier,
    paper_hidden_widths,
    save_ensemble,
)
from pipeline.heads.pixel_ensemble.inference import predict_with_uncertainty
from pipeline.heads.pixel_ensemble.members import train_ensemble, train_member
from pipeline.store.schema import FeatureDescription


def test_architecture_follows_class_count():
    assert paper_hidden_widths(29) == (128, 32) and paper_hidden_widths(30) == (256, 128)
    model = make_pixel_classifier(40, 34, torch.Generator().manual_seed(0))
    kinds = [type(layer).__name__ for layer in model]
    assert kinds == ["Linear", "ReLU", "BatchNorm1d", "Linear", "ReLU", "BatchNorm1d", "Linear"]
    assert [model[0].out_features, model[3].out_features, model[6].out_features] == [256, 128, 34]


def test_initialisation_is_normal_002_with_zero_bias_and_default_batchnorm():
    model = make_pixel_classifier(2000, 5, torch.Generator().manual_seed(0))
    assert model[0].weight.detach().std().item() == pytest.approx(0.02, rel=0.02)
    assert abs(model[0].weight.detach().mean().item()) < 1e-3
    assert all(float(model[i].bias.detach().abs().max()) == 0.0 for i in (0, 3, 6))
    assert (model[2].weight == 1).all() and (model[2].bias == 0).all()


def _constant_loss_batches(batches_per_epoch):
    """Batches whose loss cannot improve (zero features, fixed labels), to test the stopping rule."""
    features, labels = torch.zeros(64, 8), torch.arange(64) % 2

    def epoch_batches(epoch):
        return [(features, labels)] * batches_per_epoch

    return epoch_batches


def test_stopping_rule_counts_from_epoch_four_and_stops_after_more_than_patience():
    settings = TrainSettings(patience=50, patience_from_epoch=4, max_epochs=100)
    model = make_pixel_classifier(8, 2, torch.Generator().manual_seed(0))
    # With zero features the loss settles at ln 2 and never sets a new best after its first value,
    # so the member stops 52 iterations into epoch 4: one new best, then 51 without.
    log = train_member(model, _constant_loss_batches(60), settings)
    assert log.stopped_early
    assert log.iterations == 4 * 60 + 52
    assert log.epochs == 5


def test_without_stopping_all_epochs_run():
    settings = TrainSettings(patience=10_000, max_epochs=3)
    model = make_pixel_classifier(8, 2, torch.Generator().manual_seed(0))
    log = train_member(model, _constant_loss_batches(5), settings)
    assert (log.epochs, log.iterations, log.stopped_early) == (3, 15, False)
    assert len(log.epoch_mean_loss) == 3


def _separable_batches(member, epoch, feature_dim=6, count=512):
    generator = torch.Generator().manual_seed(1000 * member + epoch)
    labels = torch.randint(0, 3, (count,), generator=generator)
    features = torch.randn(count, feature_dim, generator=generator) * 0.3
    features[torch.arange(count), labels] += 2.0
    return list(zip(features.split(64), labels.split(64)))


FEATURES = FeatureDescription({"kind": "synthetic"}, [50], ["decoder.5"], 16, 6)


def test_ensemble_learns_separable_classes_and_round_trips(tmp_path):
    settings = TrainSettings(members=3, max_epochs=6, patience=20)
    ensemble = train_ensemble(_separable_batches, 6, ["a", "b", "c"], 255, FEATURES, settings, show_progress=False)
    features, labels = zip(*_separable_batches(99, 0))
    features, labels = torch.cat(features), torch.cat(labels)
    predicted, disagreement = predict_with_uncertainty(ensemble.members, features)
    assert (predicted == labels).float().mean() > 0.95
    assert disagreement.shape == (512,) and (disagreement >= -1e-6).all()
    save_ensemble(ensemble, tmp_path / "ensemble")
    loaded = load_ensemble(tmp_path / "ensemble")
    assert loaded.class_names == ["a", "b", "c"] and loaded.features == FEATURES
    assert [log.epochs for log in loaded.logs] == [log.epochs for log in ensemble.logs]
    reloaded_prediction, reloaded_disagreement = predict_with_uncertainty(loaded.members, features)
    assert torch.equal(reloaded_prediction, predicted)
    torch.testing.assert_close(reloaded_disagreement, disagreement)


def test_members_differ():
    settings = TrainSettings(members=2, max_epochs=1)
    ensemble = train_ensemble(_separable_batches, 6, ["a", "b", "c"], 255, {}, settings, show_progress=False)
    assert not torch.equal(ensemble.members[0][0].weight, ensemble.members[1][0].weight)


class _FixedLogits(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits, dtype=torch.float32)

    def forward(self, features):
        return self.logits.expand(len(features), -1)


def test_votes_and_jensen_shannon_by_hand():
    # Two members vote class 0, one votes class 1: the mode is 0.
    members = [_FixedLogits([5.0, 0.0]), _FixedLogits([5.0, 0.0]), _FixedLogits([0.0, 5.0])]
    labels, disagreement = predict_with_uncertainty(members, torch.zeros(4, 3))
    assert labels.tolist() == [0, 0, 0, 0]
    probabilities = torch.softmax(torch.tensor([[5.0, 0.0], [5.0, 0.0], [0.0, 5.0]]), dim=1)
    entropy = lambda p: -(p * p.log()).sum(-1)
    expected = entropy(probabilities.mean(0)) - entropy(probabilities).mean()
    torch.testing.assert_close(disagreement, expected.expand(4))
    # Members that agree have no disagreement.
    _, agreement = predict_with_uncertainty([_FixedLogits([1.0, 2.0])] * 3, torch.zeros(2, 3))
    torch.testing.assert_close(agreement, torch.zeros(2), atol=1e-6, rtol=0)


def test_an_ensemble_saved_by_the_block_numbered_format_is_refused_with_a_reason(tmp_path):
    settings = TrainSettings(members=1, max_epochs=1)
    ensemble = train_ensemble(_separable_batches, 6, ["a", "b", "c"], 255, FEATURES, settings, show_progress=False)
    save_ensemble(ensemble, tmp_path / "ensemble")
    config_path = tmp_path / "ensemble" / "ensemble.json"
    config = json.loads(config_path.read_text())
    config["features"] = {"steps": [50], "blocks": [5], "checkpoint_sha256": "0" * 64, "image_size": 16,
                          "noise_seed": 0, "feature_dim": 6}
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="older segcache.*train it again"):
        load_ensemble(tmp_path / "ensemble")


@pytest.mark.parametrize("protocol", ["paper", "fast"])
def test_hidden_widths_come_from_the_settings_and_are_saved(tmp_path, protocol):
    from pipeline.heads.pixel_ensemble.members import train_fused

    settings = TrainSettings(protocol=protocol, members=2, max_epochs=1, hidden_widths=[16, 8], fast_min_steps=0)
    if protocol == "paper":
        ensemble = train_ensemble(_separable_batches, 6, ["a", "b", "c"], 255, FEATURES, settings, show_progress=False)
    else:
        def epoch_batches(epoch):  # both members see the same batches: (2, B, D), (2, B)
            for features, labels in _separable_batches(0, epoch):
                yield torch.stack([features] * 2), torch.stack([labels] * 2)

        members, logs = train_fused(epoch_batches, 6, 3, 512, settings, show_progress=False)
        ensemble = Ensemble(members, 6, ["a", "b", "c"], 255, FEATURES, logs)
    assert [ensemble.members[0][0].out_features, ensemble.members[0][3].out_features] == [16, 8]
    save_ensemble(ensemble, tmp_path / "ensemble")
    assert load_ensemble(tmp_path / "ensemble").members[1][3].out_features == 8
    with pytest.raises(ValueError, match="two positive widths"):
        TrainSettings(hidden_widths=[16])


def test_vote_ties_go_to_the_smallest_label():
    members = [_FixedLogits([0.0, 0.0, 9.0]), _FixedLogits([0.0, 9.0, 0.0])]
    labels, _ = predict_with_uncertainty(members, torch.zeros(1, 1))
    assert labels.tolist() == [1]


def test_saving_replaces_an_old_ensemble_atomically(tmp_path):
    settings = TrainSettings(members=1, max_epochs=1)
    first = train_ensemble(_separable_batches, 6, ["a", "b", "c"], 255, FEATURES, settings, show_progress=False)
    save_ensemble(first, tmp_path / "ensemble")
    second = dataclasses.replace(first, features=dataclasses.replace(FEATURES, steps=[150]))
    save_ensemble(second, tmp_path / "ensemble")
    assert load_ensemble(tmp_path / "ensemble").features.steps == [150]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ensemble"]


def test_loading_a_missing_ensemble_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no trained ensemble"):
        load_ensemble(tmp_path)


def test_fused_members_compute_what_separate_members_compute():
    from pipeline.heads.pixel_ensemble.members import FusedMembers

    members = [make_pixel_classifier(12, 4, torch.Generator().manual_seed(seed)) for seed in range(3)]
    fused = FusedMembers(members)
    features = torch.randn(3, 16, 12, generator=torch.Generator().manual_seed(9))  # (M, B, D)
    # Training mode: each member normalises with its own batch's statistics.
    for member in members:
        member.train()
    fused.train()
    separate = torch.stack([member(features[m]) for m, member in enumerate(members)])
    torch.testing.assert_close(fused(features), separate, atol=1e-5, rtol=1e-5)
    # Gradients of the summed loss equal each member's own gradient.
    labels = torch.randint(0, 4, (3, 16), generator=torch.Generator().manual_seed(1))
    loss = torch.nn.functional.cross_entropy(fused(features).reshape(-1, 4), labels.reshape(-1), reduction="none")
    loss.reshape(3, 16).mean(dim=1).sum().backward()
    own = torch.nn.functional.cross_entropy(members[1](features[1]), labels[1])
    own.backward()
    torch.testing.assert_close(fused.weights[0].grad[1], members[1][0].weight.grad.T, atol=1e-6, rtol=1e-4)
    # Unfused members in eval mode match the fused module in eval mode.
    fused.eval()
    unfused = fused.unfuse(12, 4)
    torch.testing.assert_close(
        torch.stack([member(features[m]) for m, member in enumerate(unfused)]), fused(features), atol=1e-5, rtol=1e-5
    )


def test_fast_protocol_learns_separable_classes():
    from pipeline.heads.pixel_ensemble.members import train_fused

    def epoch_batches(epoch):
        batches = [_separable_batches(member, epoch) for member in range(3)]  # per member: list of (B, D), (B,)
        for parts in zip(*batches):
            yield torch.stack([f for f, _ in parts]), torch.stack([l for _, l in parts])

    settings = TrainSettings(members=3, fast_batch_size=64, fast_learning_rate=0.004, fast_epochs=4, fast_min_steps=0)
    members, logs = train_fused(epoch_batches, 6, 3, 512, settings, show_progress=False)
    assert len(members) == 3 and len(logs) == 3
    assert (logs[0].epochs, logs[0].iterations) == (4, 4 * 512 // 64)
    features, labels = zip(*_separable_batches(99, 0))
    predicted, _ = predict_with_uncertainty(members, torch.cat(features))
    assert (predicted == torch.cat(labels)).float().mean() > 0.95


def test_fast_protocol_stops_at_its_budget_of_passes_even_mid_epoch():
    from pipeline.heads.pixel_ensemble.members import train_fused

    def epoch_batches(epoch):
        for features, labels in _separable_batches(0, epoch):  # 8 batches of 64
            yield features.expand(2, -1, -1), labels.expand(2, -1)

    settings = TrainSettings(members=2, fast_batch_size=64, fast_epochs=1.5, fast_min_steps=0)
    _, logs = train_fused(epoch_batches, 6, 3, 512, settings, show_progress=False)
    assert (logs[0].epochs, logs[0].iterations) == (2, 12)
    # With few pixels the step floor sets the budget instead: 20 steps are 2.5 passes.
    floored = dataclasses.replace(settings, fast_min_steps=20)
    _, logs = train_fused(epoch_batches, 6, 3, 512, floored, show_progress=False)
    assert (logs[0].epochs, logs[0].iterations) == (3, 20)


def test_predicting_from_block_tables_equals_predicting_from_upsampled_features():
    """Each member's first layer at the blocks' own resolution, upsampled after: the same
    labels and disagreement as the full upsampled feature vectors."""
    from pipeline.heads.pixel_ensemble.inference import predict_from_block_tables
    from pipeline.store.bilinear import upsample_and_concatenate

    generator = torch.Generator().manual_seed(0)
    size, shapes = 24, [(6, 3, 3), (4, 6, 6), (5, 12, 12), (3, 24, 24)]
    tables = [torch.randn(*shape, generator=generator).half() for shape in shapes]  # as a store holds them
    members = []
    for seed in range(3):
        member = make_pixel_classifier(sum(shape[0] for shape in shapes), 5, torch.Generator().manual_seed(seed))
        for norm in (member[2], member[5]):  # trained-looking BatchNorm statistics
            norm.running_mean.normal_(0.0, 0.1, generator=generator)
            norm.running_var.uniform_(0.5, 2.0, generator=generator)
        members.append(member.eval())
    features = upsample_and_concatenate([table[None] for table in tables], size)[0].reshape(size * size, -1)  # (S·S, D)
    expected_labels, expected_disagreement = predict_with_uncertainty(members, features)
    labels, disagreement = predict_from_block_tables(members, tables, size)
    assert torch.equal(labels, expected_labels)
    assert torch.allclose(disagreement, expected_disagreement, atol=1e-5)
