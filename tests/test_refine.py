"""The mask-prior refiner: it learns to fix a segmenter's mistakes, and its stages refuse mismatches."""

import dataclasses
import json

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from cli import main
from conftest import write_image_folder, write_learnable_store
from pipeline.config import RefineSettings
from pipeline.evaluation.predictions import Predictions, create_predictions
from pipeline.extraction.pixels import extract_pixel_features
from pipeline.refine.conditioning import FeatureProjection
from pipeline.refine.mask_diffusion import MaskDiffusion
from pipeline.refine.refining import Refiner, refine_image, refine_predictions
from pipeline.refine.training import fit_denoiser
from pipeline.store.reader import FeatureStore
from pipeline.store.schema import StoreMismatchError


def _squares(count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(count, size, size) int64: a square of class 1 on class 0."""
    maps = np.zeros((count, size, size), dtype=np.int64)
    for square in maps:
        side = rng.integers(6, 10)
        top, left = rng.integers(0, size - side, size=2)
        square[top: top + side, left: left + side] = 1
    return maps


def _salt_and_pepper(maps: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    flipped = rng.random(maps.shape) < fraction
    return np.where(flipped, 1 - maps, maps)


def test_a_refiner_trained_on_noisy_squares_removes_salt_and_pepper():
    rng = np.random.default_rng(0)
    truths = _squares(32, 16, rng)
    starts = _salt_and_pepper(truths, 0.1, rng)
    blank = torch.zeros((32, 1, 16, 16))  # nothing but the noisy map to go on: the mask prior alone
    settings = RefineSettings(diffusion_steps=10, width=16, iterations=300, batch_size=8, learning_rate=0.003, crop=1.0,
                              device="cpu", threads=1, schedule=[1])
    model, losses = fit_denoiser(blank, torch.from_numpy(starts), torch.from_numpy(truths), 2, settings, show_progress=False)
    assert np.mean(losses[-30:]) < 0.7 * np.mean(losses[:30])  # high steps stay uncertain: the map is noise there
    refiner = Refiner(model, MaskDiffusion(2, 10), FeatureProjection(np.zeros((0, 1), np.float32), np.zeros(0, np.float32)),
                      ["background", "square"], 255, features=None)
    new_truths = _squares(8, 16, rng)
    new_starts = _salt_and_pepper(new_truths, 0.1, rng)
    generator = torch.Generator().manual_seed(0)
    errors_before = errors_after = 0
    for truth, start in zip(new_truths, new_starts):
        probabilities, labels = refine_image(refiner, torch.zeros((1, 16, 16)), start, [1], generator)
        assert probabilities.shape == (2, 16, 16) and labels.dtype == np.int64
        errors_before += int((start != truth).sum())
        errors_after += int((labels != truth).sum())
    assert errors_after < 0.3 * errors_before, (errors_before, errors_after)


def test_the_projection_of_a_native_store_equals_projecting_its_upsampled_features(tmp_path):
    write_learnable_store(tmp_path / "store.zarr", count=2, noise=0.5)
    store = FeatureStore(tmp_path / "store.zarr")
    dense = store.image_features(1)  # (S, S, D): the upsampled pixel vectors
    projection = FeatureProjection.fit(dense.reshape(-1, dense.shape[-1]), dims=4)
    expected = np.einsum("pd,hwd->phw", projection.weight, dense) + projection.bias[:, None, None]
    np.testing.assert_allclose(projection.project_image(store, 1).numpy(), expected, atol=2e-3)  # float16 features
    projected = expected.reshape(4, -1)
    np.testing.assert_allclose(projected.std(axis=1), 1.0, rtol=5e-3)  # whitened on the pixels it was fitted on


def _invoke(*arguments):
    result = CliRunner().invoke(main, ["--quiet", *map(str, arguments)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_refine_train_and_refine_through_the_command_line(tmp_path):
    write_learnable_store(tmp_path / "train.zarr", count=4, seed=0, noise=1.0)
    write_learnable_store(tmp_path / "test.zarr", count=3, seed=1, noise=1.0)
    _invoke("train", "--store", tmp_path / "train.zarr", "--out", tmp_path / "ensemble", "--members", 1, "--max-epochs", 2)
    _invoke("evaluate", "--ensemble", tmp_path / "ensemble", "--store", tmp_path / "test.zarr", "--out", tmp_path / "results")
    _invoke("refine-train", "--ensemble", tmp_path / "ensemble", "--store", tmp_path / "train.zarr", "--out",
            tmp_path / "refiner", "--first-prediction", "out_of_fold", "--folds", 2, "--members", 1, "--iterations", 20,
            "--projection-dims", 4, "--device", "cpu")
    config = json.loads((tmp_path / "refiner" / "refiner.json").read_text())
    assert config["condition_channels"] == 3 + 4 and config["first_prediction"] == "out_of_fold"
    _invoke("refine", "--refiner", tmp_path / "refiner", "--predictions", tmp_path / "results" / "predictions.zarr",
            "--store", tmp_path / "test.zarr", "--out", tmp_path / "refined", "--schedule", "3,1")
    refined = Predictions(tmp_path / "refined" / "predictions.zarr")
    assert refined.image_names == ["image_00", "image_01", "image_02"] and refined.class_names == config["class_names"]
    probabilities, labels = refined.probabilities(0), refined.labels(0)
    stored = zarr.open_group(str(tmp_path / "refined" / "predictions.zarr"), mode="r")
    assert stored["probabilities"].dtype == np.float16 and stored["labels"].dtype == np.int16
    assert probabilities.shape == (3, 16, 16) and labels.shape == (16, 16)
    np.testing.assert_allclose(probabilities.astype(np.float32).sum(axis=0), 1.0, atol=5e-3)
    assert refined.uncertainty(0).shape == (16, 16)
    metrics = json.loads((tmp_path / "refined" / "metrics.json").read_text())
    assert 0 <= metrics["miou"] <= 1 and (tmp_path / "refined" / "predictions.png").stat().st_size > 1000
    assert sorted(path.name for path in (tmp_path / "refined" / "masks").glob("*.npy")) == [
        "image_00.npy", "image_01.npy", "image_02.npy"]


def test_refine_refuses_other_classes_and_other_features(tmp_path):
    write_learnable_store(tmp_path / "train.zarr", count=4, seed=0, noise=1.0)
    _invoke("train", "--store", tmp_path / "train.zarr", "--out", tmp_path / "ensemble", "--members", 1, "--max-epochs", 1)
    _invoke("refine-train", "--ensemble", tmp_path / "ensemble", "--store", tmp_path / "train.zarr", "--out",
            tmp_path / "refiner", "--iterations", 2, "--device", "cpu")  # in-fold, the default
    _invoke("evaluate", "--ensemble", tmp_path / "ensemble", "--store", tmp_path / "train.zarr", "--out", tmp_path / "results")
    other_classes = create_predictions(tmp_path / "other.zarr", ["image_00"], ["sky", "road", "car"], 255, 16, False)
    other_classes.write(0, np.full((3, 16, 16), 1 / 3, np.float32))
    with pytest.raises(ValueError, match=r"classes \['sky', 'road', 'car'\].*refiner"):
        refine_predictions(tmp_path / "refiner", tmp_path / "other.zarr", tmp_path / "train.zarr", tmp_path / "x.zarr", [1])
    images = write_image_folder(tmp_path / "images", count=2, size=16)
    extract_pixel_features(images, tmp_path / "pixels.zarr", 16, show_progress=False)  # raw pixels: no such taps
    with pytest.raises(StoreMismatchError, match=r"refiner .* was trained on steps \[50, 150\] and taps .*holds no"):
        refine_predictions(tmp_path / "refiner", tmp_path / "results" / "predictions.zarr", tmp_path / "pixels.zarr",
                           tmp_path / "x.zarr", [1])
    with pytest.raises(ValueError, match="outside 1..10"):
        refine_predictions(tmp_path / "refiner", tmp_path / "results" / "predictions.zarr", tmp_path / "train.zarr",
                           tmp_path / "x.zarr", [12])
    assert not (tmp_path / "x.zarr").exists()  # nothing half-written
    assert dataclasses.is_dataclass(RefineSettings())
