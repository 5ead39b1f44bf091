import numpy as np
import pytest
import zarr

from pipeline.evaluation.predictions import Predictions, create_predictions

NAMES, CLASSES, SIZE = ["a", "b", "c"], ["background", "round", "square"], 4


def random_probabilities(seed: int) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(size=(len(CLASSES), SIZE, SIZE)).astype(np.float32)
    return np.exp(logits) / np.exp(logits).sum(axis=0)  # (K, S, S)


def test_a_written_folder_reads_back_as_float16_with_its_schema(tmp_path):
    writer = create_predictions(tmp_path / "p.zarr", NAMES, CLASSES, 255, SIZE, has_uncertainty=True, provenance={"by": "test"})
    labels = np.arange(SIZE * SIZE).reshape(SIZE, SIZE) % 3
    uncertainty = np.linspace(0, 1, SIZE * SIZE, dtype=np.float32).reshape(SIZE, SIZE) / 3
    for position in range(len(NAMES)):
        writer.write(position, random_probabilities(position), labels, uncertainty)
    predictions = Predictions(tmp_path / "p.zarr")
    assert (predictions.image_names, predictions.class_names, predictions.num_classes) == (NAMES, CLASSES, 3)
    assert (predictions.ignore_label, predictions.image_size, len(predictions)) == (255, SIZE, 3)
    assert predictions.provenance == {"by": "test"} and predictions.position("b") == 1
    np.testing.assert_array_equal(predictions.probabilities(1), random_probabilities(1).astype(np.float16))
    assert predictions.probabilities(1).dtype == np.float32
    np.testing.assert_array_equal(predictions.labels(2), labels)
    np.testing.assert_array_equal(predictions.uncertainty(0), uncertainty.astype(np.float16))
    # The score is the float32 map's top-decile mean (int(16 / 10) = 1 value: the largest), before rounding.
    assert predictions.uncertainty_score(0) == pytest.approx(float(uncertainty.max()), abs=1e-7)
    assert predictions.done_mask().all()


def test_the_arrays_are_zarr_v3_float16_one_chunk_per_image(tmp_path):
    writer = create_predictions(tmp_path / "p.zarr", NAMES, CLASSES, 255, SIZE, has_uncertainty=True)
    writer.write(0, random_probabilities(0), uncertainty=np.zeros((SIZE, SIZE), np.float32))
    group = zarr.open_group(str(tmp_path / "p.zarr"), mode="r")
    assert group.metadata.zarr_format == 3
    assert group["probabilities"].shape == (3, 3, SIZE, SIZE) and group["probabilities"].chunks == (1, 3, SIZE, SIZE)
    assert group["probabilities"].dtype == np.float16 and group["uncertainty"].dtype == np.float16
    assert group["labels"].chunks == (1, SIZE, SIZE)
    # Only image 0's chunks exist: each image is its own region.
    assert (tmp_path / "p.zarr" / "probabilities" / "c" / "0" / "0" / "0" / "0").is_file()
    assert not (tmp_path / "p.zarr" / "probabilities" / "c" / "1").exists()


def test_labels_default_to_the_argmax_of_the_stored_float16_probabilities(tmp_path):
    writer = create_predictions(tmp_path / "p.zarr", ["a"], CLASSES, 255, 1, has_uncertainty=False)
    # 0.50001 and 0.5 round to the same float16: a tie, broken towards the smaller class.
    writer.write(0, np.array([0.5, 0.50001, 0.0], dtype=np.float32).reshape(3, 1, 1))
    predictions = Predictions(tmp_path / "p.zarr")
    assert predictions.labels(0).item() == 0
    assert predictions.uncertainty(0) is None and predictions.uncertainty_score(0) is None


def test_unfinished_images_and_bad_writes_are_refused(tmp_path):
    writer = create_predictions(tmp_path / "p.zarr", NAMES, CLASSES, 255, SIZE, has_uncertainty=True)
    with pytest.raises(ValueError, match="shape"):
        writer.write(0, np.zeros((2, SIZE, SIZE)), uncertainty=np.zeros((SIZE, SIZE)))
    with pytest.raises(ValueError, match="uncertainty"):
        writer.write(0, random_probabilities(0))
    predictions = Predictions(tmp_path / "p.zarr")
    assert not predictions.done_mask().any()
    with pytest.raises(ValueError, match="not completely written"):
        predictions.labels(0)
    with pytest.raises(KeyError, match="'d'"):
        predictions.position("d")
    with pytest.raises(ValueError, match="repeat"):
        create_predictions(tmp_path / "q.zarr", ["a", "a"], CLASSES, 255, SIZE, has_uncertainty=False)


def test_a_missing_folder_or_another_format_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no predictions"):
        Predictions(tmp_path / "absent.zarr")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w", zarr_format=3).attrs["segcache_predictions"] = {"format": 99}
    with pytest.raises(ValueError, match="format 99"):
        Predictions(tmp_path / "other.zarr")
