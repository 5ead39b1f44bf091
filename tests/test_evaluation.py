import json

import numpy as np
import pytest
from PIL import Image

from conftest import write_learnable_store
from pipeline.config import EvaluateSettings, TrainSettings
from pipeline.evaluation.evaluate import evaluate_on_store
from pipeline.evaluation.predict import predict_from_tables, predict_pixels, predict_store
from pipeline.evaluation.predictions import Predictions, create_predictions
from pipeline.evaluation.report import write_masks_and_pictures
from pipeline.evaluation.scoring import score_predictions
from pipeline.heads.pixel_ensemble.ensemble import load_ensemble
from pipeline.heads.pixel_ensemble.inference import member_logits_from_tables, predict_from_block_tables
from pipeline.heads.pixel_ensemble.training import train_on_store
from pipeline.metrics import IoUAccumulator, top_decile_mean
from pipeline.store.reader import FeatureStore
from pipeline.store.schema import StoreMismatchError


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluation")
    write_learnable_store(root / "train.zarr", seed=0)
    write_learnable_store(root / "test.zarr", count=3, seed=1)
    settings = TrainSettings(members=3, max_epochs=8, buffer_pixels=300, device="cpu")
    train_on_store(root / "train.zarr", root / "ensemble", settings, show_progress=False)
    return root


def test_evaluation_scores_masks_and_pictures(trained, tmp_path):
    metrics = evaluate_on_store(
        trained / "ensemble", trained / "test.zarr", tmp_path, EvaluateSettings(pictures=2), show_progress=False
    )
    assert metrics["miou"] > 0.9 and metrics["pixel_accuracy"] > 0.95 and metrics["images"] == 3
    # The headline is the official IoU; both definitions are reported (equal here: no ignored pixels).
    assert metrics["iou_definition"] == "paper" and metrics["miou"] == metrics["miou_paper"]
    assert metrics["miou_ignore_excluded"] == pytest.approx(metrics["miou_paper"])
    assert set(metrics["per_class_iou"]) == {"background", "round", "square"}
    assert metrics["mean_uncertainty"] >= 0
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert Predictions(tmp_path / "predictions.zarr").image_names == ["image_00", "image_01", "image_02"]
    for name in ("image_00", "image_01", "image_02"):
        mask = np.load(tmp_path / "masks" / f"{name}.npy")
        assert mask.shape == (16, 16) and set(np.unique(mask)) <= {0, 1, 2}
        assert Image.open(tmp_path / "masks" / f"{name}.png").size == (16, 16)
    assert Image.open(tmp_path / "predictions.png").size[0] > 200
    assert (tmp_path / "per_class_iou.png").is_file()


def test_band_size_does_not_change_the_prediction(trained, tmp_path):
    evaluate_on_store(trained / "ensemble", trained / "test.zarr", tmp_path / "a", EvaluateSettings(pixels_per_batch=16), show_progress=False)
    evaluate_on_store(trained / "ensemble", trained / "test.zarr", tmp_path / "b", EvaluateSettings(pixels_per_batch=100000), show_progress=False)
    np.testing.assert_array_equal(np.load(tmp_path / "a" / "masks" / "image_01.npy"), np.load(tmp_path / "b" / "masks" / "image_01.npy"))


def test_an_ensemble_of_other_features_is_refused(trained, tmp_path):
    config_path = trained / "ensemble" / "ensemble.json"
    original = config_path.read_text()
    config = json.loads(original)
    config["features"]["source"]["checkpoint_sha256"] = "f" * 64
    config_path.write_text(json.dumps(config))
    try:
        with pytest.raises(StoreMismatchError, match="source.checkpoint_sha256: 'f{64}' vs '0{64}'"):
            evaluate_on_store(trained / "ensemble", trained / "test.zarr", tmp_path, EvaluateSettings(), show_progress=False)
    finally:
        config_path.write_text(original)


def _fused_metrics(ensemble_dir, store_path) -> dict:
    """The metrics as the fused evaluation computed them before the split (its loop, verbatim
    in substance): labels and disagreement straight from the heads' inference, in float32."""
    ensemble, store = load_ensemble(ensemble_dir), FeatureStore(store_path)
    accumulator, uncertainties = IoUAccumulator(ensemble.num_classes, ensemble.ignore_label), []
    for index in np.flatnonzero(store.done_mask()):
        labels, disagreement = predict_from_block_tables(ensemble.members, store.block_tables(int(index)), store.image_size)
        accumulator.update(labels.numpy().reshape(store.image_size, -1), store.labels(int(index)))
        uncertainties.append(top_decile_mean(disagreement.numpy()))
    per_class = accumulator.per_class_iou("paper")
    return {
        "miou": round(accumulator.mean_iou("paper"), 6), "iou_definition": "paper",
        "miou_paper": round(accumulator.mean_iou("paper"), 6),
        "miou_ignore_excluded": round(accumulator.mean_iou("ignore_excluded"), 6),
        "pixel_accuracy": round(accumulator.pixel_accuracy(), 6),
        "mean_uncertainty": round(float(np.mean(uncertainties)), 6),
        "per_class_iou": {ensemble.class_names[k]: round(float(per_class[k]), 6) for k in accumulator.scored_classes()},
        "images": len(uncertainties),
    }


def test_predict_then_score_equals_the_fused_evaluation(trained, tmp_path):
    # A weakly trained ensemble, so that votes and mean probabilities disagree somewhere.
    write_learnable_store(tmp_path / "noisy.zarr", count=3, seed=1, noise=3.0)
    predictions = predict_store(trained / "ensemble", tmp_path / "noisy.zarr", tmp_path / "p.zarr", show_progress=False)
    metrics = score_predictions(tmp_path / "p.zarr", tmp_path / "noisy.zarr", "paper", show_progress=False)
    assert metrics == _fused_metrics(trained / "ensemble", tmp_path / "noisy.zarr")
    probabilities = np.stack([predictions.probabilities(position) for position in range(len(predictions))])
    assert probabilities.shape == (3, 3, 16, 16)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=3e-3)  # float16 rounding of each class
    # Why the labels are stored: the members' votes are not always the mean probabilities' argmax.
    labels = np.stack([predictions.labels(position) for position in range(len(predictions))])
    assert (labels != probabilities.argmax(axis=1)).any()


def test_the_logits_path_gives_the_heads_labels_and_disagreement_bit_for_bit(trained):
    ensemble, store = load_ensemble(trained / "ensemble"), FeatureStore(trained / "test.zarr")
    tables = store.block_tables(1)
    labels, disagreement = predict_from_block_tables(ensemble.members, tables, store.image_size)
    prediction = predict_from_tables(ensemble, tables, store.image_size)
    assert np.array_equal(prediction.labels.ravel(), labels.numpy())
    assert np.array_equal(prediction.disagreement.ravel(), disagreement.numpy())
    logits = member_logits_from_tables(ensemble.members, tables, store.image_size)  # (M, S·S, K)
    assert logits.shape == (3, 256, 3)
    expected = logits.softmax(dim=2).mean(dim=0).numpy().T.reshape(3, 16, 16)
    np.testing.assert_array_equal(prediction.mean_probabilities, expected)


def test_pixel_vectors_and_block_tables_give_the_same_probabilities(trained):
    ensemble, store = load_ensemble(trained / "ensemble"), FeatureStore(trained / "test.zarr")
    from_tables = predict_from_tables(ensemble, store.block_tables(2), store.image_size)
    from_pixels = predict_pixels(ensemble, lambda ys, xs: store.pixel_features(2, ys, xs), store.image_size, 40)
    np.testing.assert_allclose(from_pixels.mean_probabilities, from_tables.mean_probabilities, atol=1e-5)
    np.testing.assert_array_equal(from_pixels.labels, from_tables.labels)


def test_refined_predictions_in_the_same_format_are_scored_and_drawn(trained, tmp_path):
    """The refiner's path: read predictions, write others in the same format, score and draw them."""
    raw = predict_store(trained / "ensemble", trained / "test.zarr", tmp_path / "raw.zarr", show_progress=False)
    writer = create_predictions(tmp_path / "refined.zarr", raw.image_names, raw.class_names, raw.ignore_label,
                                raw.image_size, has_uncertainty=False, provenance={"refined_from": str(tmp_path / "raw.zarr")})
    for position in range(len(raw)):
        sharpened = raw.probabilities(position) ** 4
        writer.write(position, sharpened / sharpened.sum(axis=0))  # labels: the argmax of what is stored
    refined = score_predictions(tmp_path / "refined.zarr", trained / "test.zarr", show_progress=False)
    assert refined["images"] == 3 and refined["miou"] > 0.9 and refined["mean_uncertainty"] is None
    write_masks_and_pictures(tmp_path / "refined.zarr", trained / "test.zarr", tmp_path / "out", show_progress=False)
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "masks" / "image_01.npy"), Predictions(tmp_path / "refined.zarr").labels(1))


def test_an_ensemble_trained_on_a_subset_is_evaluated_on_that_subset_of_any_store_holding_it(trained, tmp_path):
    # The label lives in the last tap (decoder.12) at every step: one step of it is enough.
    settings = TrainSettings(members=2, max_epochs=8, buffer_pixels=300, device="cpu", steps=[150], blocks=[12])
    train_on_store(trained / "train.zarr", tmp_path / "subset", settings, show_progress=False)
    ensemble = load_ensemble(tmp_path / "subset")
    assert (ensemble.features.steps, ensemble.features.taps, ensemble.feature_dim) == ([150], ["decoder.12"], 2)
    metrics = evaluate_on_store(tmp_path / "subset", trained / "test.zarr", tmp_path / "out", EvaluateSettings(),
                                show_progress=False)
    assert metrics["miou"] > 0.9
    # A store without that tap is refused, naming what is missing and what it has.
    write_learnable_store(tmp_path / "other.zarr", count=1, seed=2)
    import zarr

    group = zarr.open_group(tmp_path / "other.zarr", mode="r+")
    group.attrs["segcache"] = {**group.attrs["segcache"], "steps": [50, 250]}  # as if extracted at other steps
    with pytest.raises(StoreMismatchError, match=r"trained on steps \[150\].*no step \[150\]"):
        evaluate_on_store(tmp_path / "subset", tmp_path / "other.zarr", tmp_path / "out2", EvaluateSettings(),
                          show_progress=False)
