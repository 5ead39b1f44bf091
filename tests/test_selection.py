"""Choosing steps and taps from the labeled images alone: a cheap probe, cross-validated over images."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli import main
from conftest import write_learnable_store
from pipeline.heads.selection import select_steps_and_taps
from pipeline.heads.selection_file import read_selection

CLASSES = ["background", "round", "square"]


def test_the_tap_that_holds_the_labels_is_chosen(tmp_path):
    # The learnable store encodes the labels in decoder.12 only (at both steps), plus noise.
    write_learnable_store(tmp_path / "train.zarr", count=4, seed=0, noise=0.5)
    selection = select_steps_and_taps(tmp_path / "train.zarr", CLASSES, 255, folds=4, pixels_per_image=200,
                                      show_progress=False)
    assert selection.taps == ["decoder.12"] and len(selection.steps) >= 1
    assert selection.single["t50 decoder.12"] > 0.9 > selection.single["t50 decoder.5"]
    assert selection.validation_miou == selection.order[-1]["miou"] and selection.folds == 4
    assert selection.per_class_best_tap["square"] == "decoder.12"


def test_candidates_restrict_the_choice_and_score_each_as_the_full_run_does(tmp_path):
    write_learnable_store(tmp_path / "train.zarr", count=4, seed=0, noise=0.5)
    full = select_steps_and_taps(tmp_path / "train.zarr", CLASSES, 255, folds=4, pixels_per_image=200,
                                 show_progress=False)
    without = select_steps_and_taps(tmp_path / "train.zarr", CLASSES, 255, folds=4, pixels_per_image=200,
                                    show_progress=False, candidate_steps=[50], candidate_blocks=[5, 8])
    assert set(without.single) == {"t50 decoder.5", "t50 decoder.8"} and without.steps == [50]
    assert set(without.taps) <= {"decoder.5", "decoder.8"}
    for name, miou in without.single.items():  # the same probe on the same pixels: the same scores
        assert miou == pytest.approx(full.single[name], abs=1e-9)
    restricted = select_steps_and_taps(tmp_path / "train.zarr", CLASSES, 255, folds=4, pixels_per_image=200,
                                       show_progress=False, candidate_blocks=["decoder.12"])
    assert restricted.taps == ["decoder.12"] and restricted.validation_miou == pytest.approx(full.validation_miou, abs=0.01)


def test_the_reduced_probe_keeping_every_component_chooses_as_the_exact_one(tmp_path):
    write_learnable_store(tmp_path / "train.zarr", count=4, seed=0, noise=1.0)
    arguments = {"folds": 4, "pixels_per_image": 200, "show_progress": False}
    exact = select_steps_and_taps(tmp_path / "train.zarr", CLASSES, 255, probe="exact", **arguments)
    whole = select_steps_and_taps(tmp_path / "train.zarr", CLASSES, 255, probe="reduced", components=6, **arguments)
    assert (whole.steps, whole.taps) == (exact.steps, exact.taps)
    for name, miou in exact.single.items():  # standardised groups, standardised again per fold: the same fits
        assert whole.single[name] == pytest.approx(miou, abs=2e-3)
    # One component per (step, tap): the label-carrying tap still wins, from far fewer columns.
    narrow = select_steps_and_taps(tmp_path / "train.zarr", CLASSES, 255, probe="reduced", components=1, **arguments)
    assert narrow.taps == ["decoder.12"]


def test_the_exact_probe_where_it_fits_else_the_reduced_one(tmp_path):
    from pipeline.config import SelectSettings
    from pipeline.heads.selection import select_cost

    write_learnable_store(tmp_path / "train.zarr", count=4, seed=0, noise=0.5)
    roomy = select_cost(tmp_path / "train.zarr", SelectSettings(pixels_per_image=200))
    # 4 images × 200 pixels × 24 features: 12·P·D + 8·(folds + 1)·D² bytes
    assert roomy["probe"] == "exact" and roomy["bytes"] == 12 * 800 * 24 + 48 * 24 ** 2
    tight = select_cost(tmp_path / "train.zarr", SelectSettings(pixels_per_image=200, memory_gigabytes=1e-5, components=1))
    assert tight["probe"] == "reduced" and tight["probe_features"] == 2 * 3  # one column per (step, tap)
    assert tight["bytes"] < roomy["bytes"] and tight["seconds"] > 0
    result = CliRunner().invoke(main, ["--quiet", "select", "--store", str(tmp_path / "train.zarr"), "--out",
                                       str(tmp_path / "selection"), "--folds", "2", "--pixels-per-image", "100",
                                       "--memory-gigabytes", "0.00001", "--components", "1"], catch_exceptions=False)
    assert result.exit_code == 0 and "principal components" in result.output, result.output
    assert read_selection(tmp_path / "selection" / "selection.json")[1] == ["decoder.12"]


def test_one_labeled_image_is_not_enough(tmp_path):
    write_learnable_store(tmp_path / "one.zarr", count=1)
    with pytest.raises(ValueError, match="at least 2 labeled images"):
        select_steps_and_taps(tmp_path / "one.zarr", CLASSES, 255, show_progress=False)


def test_select_writes_a_selection_that_train_reads(tmp_path):
    write_learnable_store(tmp_path / "train.zarr", count=4, seed=0, noise=0.5)

    def invoke(*arguments):
        result = CliRunner().invoke(main, ["--quiet", *map(str, arguments)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result

    result = invoke("select", "--store", tmp_path / "train.zarr", "--out", tmp_path / "selection", "--folds", 2,
                    "--pixels-per-image", 100)
    assert "features per pixel" in result.output and "GB of memory" in result.output
    steps, taps = read_selection(tmp_path / "selection" / "selection.json")
    assert taps == ["decoder.12"] and Image.open(tmp_path / "selection" / "selection.png").size[0] > 200
    invoke("train", "--store", tmp_path / "train.zarr", "--out", tmp_path / "ensemble", "--members", 1,
           "--max-epochs", 1, "--selection", tmp_path / "selection" / "selection.json")
    features = json.loads((tmp_path / "ensemble" / "ensemble.json").read_text())["features"]
    assert (features["steps"], features["taps"]) == (steps, taps)
    with pytest.raises(ValueError, match="not a selection.json"):
        read_selection(tmp_path / "ensemble" / "ensemble.json")
    assert np.isfinite(json.loads((tmp_path / "selection" / "selection.json").read_text())["validation_miou"])


@pytest.mark.parametrize("dataset", ["cat_15", "horse_21"])
def test_select_runs_on_a_real_dataset_with_the_golden_adm_tiny(shared_dir, tmp_path, dataset):
    """The mechanics on real images and label maps (adm-tiny has random weights: not the quality)."""
    from pipeline.config import ExtractSettings
    from pipeline.data.folders import first_images, list_images, load_class_info
    from pipeline.extraction.extract import extract_features

    source = shared_dir / "datasets" / "ddpm-seg" / dataset
    images = tmp_path / "images"
    images.mkdir()
    for record in first_images(list_images(source / "real" / "train"), 4, source / "real" / "train"):
        for path in (record.image_path, record.label_path):
            (images / path.name).symlink_to(path.resolve())
    classes = load_class_info(source / "classes.json")
    settings = ExtractSettings(steps=[50, 150], blocks=[5, 8, 12], size=64, batch_size=4, device="cpu")
    extract_features(shared_dir / "fixtures" / "adm-tiny" / "adm_tiny.pt", images, tmp_path / "train.zarr", settings,
                     classes, show_progress=False)
    selection = select_steps_and_taps(tmp_path / "train.zarr", classes.names, classes.ignore_label, folds=2,
                                      pixels_per_image=200, show_progress=False)
    from pipeline.store.reader import FeatureStore

    assert selection.taps and set(selection.taps) <= set(FeatureStore(tmp_path / "train.zarr").schema.taps)
    assert len(selection.single) == 2 * 3 and 0 <= selection.validation_miou <= 1
    assert selection.steps and set(selection.steps) <= {50, 150}


def test_the_ridge_probe_is_sklearns_scaled_ridge_classifier():
    """The Gram-block probe gives the predictions of StandardScaler → RidgeClassifier per fold."""
    from sklearn.linear_model import RidgeClassifier
    from sklearn.preprocessing import StandardScaler

    from pipeline.heads.selection import RidgeProbe
    from pipeline.metrics import IoUAccumulator

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=600)
    labels[labels == 3] = 2  # class 3 never occurs: never predicted
    scales = 10.0 ** rng.uniform(-2, 2, size=12)  # standardising matters
    features = ((rng.normal(size=(600, 12)) + labels[:, None] * rng.normal(size=12)) * scales + 40.0).astype(np.float32)
    features[:, 5] = 7.0  # a constant column
    fold = np.arange(600) % 3
    groups = {"a": np.arange(0, 5), "b": np.arange(5, 9), "c": np.arange(9, 12)}
    probe = RidgeProbe(features, labels, fold, num_classes=4, ignore_label=255)
    for name, columns in groups.items():
        probe.add_group(name, columns)
    for chosen in (["a"], ["b", "c"], ["c", "a", "b"]):
        columns = np.concatenate([groups[name] for name in chosen])
        expected = IoUAccumulator(4, 255)
        for held_out in range(3):
            train, test = fold != held_out, fold == held_out
            scaler = StandardScaler().fit(features[train][:, columns])
            classifier = RidgeClassifier(alpha=1.0).fit(scaler.transform(features[train][:, columns]), labels[train])
            expected.update(classifier.predict(scaler.transform(features[test][:, columns])), labels[test])
        miou, per_class = probe.score(chosen)
        assert miou == pytest.approx(expected.mean_iou("ignore_excluded"), abs=1e-9)
        np.testing.assert_allclose(per_class, expected.per_class_iou("ignore_excluded"))
        assert np.isnan(per_class[3])


def test_select_opens_no_file_of_the_test_split(tmp_path):
    """Every file Python opens during `select` (an audit hook sees them all) lies outside the test store."""
    import sys

    write_learnable_store(tmp_path / "train.zarr", count=4, seed=0, noise=0.5)
    write_learnable_store(tmp_path / "test.zarr", count=3, seed=1, noise=0.5)
    opened, recording = [], []
    sys.addaudithook(lambda event, arguments: recording and event == "open" and opened.append(str(arguments[0])))
    recording.append(True)
    try:
        select_steps_and_taps(tmp_path / "train.zarr", CLASSES, 255, folds=2, pixels_per_image=100, show_progress=False)
    finally:
        recording.clear()
    assert any("train.zarr" in path for path in opened)  # the hook does see the store's files
    assert not [path for path in opened if "test.zarr" in path]
