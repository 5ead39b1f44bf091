import numpy as np
import pytest
import torch

from conftest import STEPS, synthetic_activations, synthetic_schema, write_learnable_store
from pipeline.config import TrainSettings
from pipeline.datasets import ClassInfo
from pipeline.ensemble import load_ensemble, predict_with_uncertainty
from pipeline.store import FeatureStore, open_store_for_writing
from pipeline.training import train_on_store


SETTINGS = TrainSettings(members=3, max_epochs=8, buffer_pixels=300, device="cpu")


def test_training_saves_an_ensemble_with_its_provenance(tmp_path):
    write_learnable_store(tmp_path / "train.zarr", seed=0)
    ensemble, summary = train_on_store(tmp_path / "train.zarr", tmp_path / "ensemble", SETTINGS, show_progress=False)
    assert summary.training_pixels == 4 * 16 * 16 and summary.feature_dim == 24
    assert len(summary.epochs_per_member) == 3
    saved = load_ensemble(tmp_path / "ensemble")
    assert saved.class_names == ["background", "round", "square"] and saved.ignore_label == 255
    assert saved.features["steps"] == STEPS and saved.features["blocks"] == [5, 8, 12]


def test_training_is_reproducible_from_the_seed(tmp_path):
    write_learnable_store(tmp_path / "train.zarr")
    settings = TrainSettings(members=1, max_epochs=2, buffer_pixels=300, device="cpu")
    first, _ = train_on_store(tmp_path / "train.zarr", tmp_path / "a", settings, show_progress=False)
    second, _ = train_on_store(tmp_path / "train.zarr", tmp_path / "b", settings, show_progress=False)
    assert torch.equal(first.members[0][0].weight, second.members[0][0].weight)


def test_class_names_must_be_known(tmp_path):
    schema = synthetic_schema("native", 1)
    schema = type(schema)(**{**schema.__dict__, "classes": None})
    writer = open_store_for_writing(tmp_path / "store.zarr", schema)
    writer.write_image(0, np.zeros((16, 16, 3), np.uint8), np.zeros((16, 16)), synthetic_activations(0))
    with pytest.raises(ValueError, match="--classes"):
        train_on_store(tmp_path / "store.zarr", tmp_path / "out", SETTINGS, show_progress=False)
    classes = ClassInfo(names=["only"], ignore_label=255)
    _, summary = train_on_store(tmp_path / "store.zarr", tmp_path / "out", TrainSettings(members=1, max_epochs=1, device="cpu"), classes, show_progress=False)
    assert summary.training_pixels == 256


def test_a_store_without_labels_cannot_train(tmp_path):
    writer = open_store_for_writing(tmp_path / "store.zarr", synthetic_schema("native", 1))
    writer.write_image(0, np.zeros((16, 16, 3), np.uint8), None, synthetic_activations(0))
    with pytest.raises(ValueError, match="no labeled pixels"):
        train_on_store(tmp_path / "store.zarr", tmp_path / "out", SETTINGS, show_progress=False)


def test_fast_protocol_on_a_store(tmp_path):
    write_learnable_store(tmp_path / "train.zarr", seed=0)
    settings = TrainSettings(protocol="fast", members=4, fast_epochs=30, fast_batch_size=128, buffer_pixels=512, device="cpu")
    ensemble, summary = train_on_store(tmp_path / "train.zarr", tmp_path / "ensemble", settings, show_progress=False)
    assert len(ensemble.members) == 4 and summary.training_pixels == 1024
    store = FeatureStore(tmp_path / "train.zarr")
    ys, xs = np.arange(16).repeat(16), np.tile(np.arange(16), 16)  # every pixel, row-major
    predicted, _ = predict_with_uncertainty(load_ensemble(tmp_path / "ensemble").members, torch.from_numpy(store.pixel_features(0, ys, xs)))
    assert (predicted.numpy() == store.labels(0).ravel()).mean() > 0.95
