import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli import main
from conftest import write_image_folder
from pipeline.config import ExtractSettings, TrainSettings
from pipeline.data.folders import ClassInfo
from pipeline.extraction.extract import extract_features
from pipeline.heads.pixel_ensemble.training import train_on_store
from pipeline.prediction import predict_folder
from pipeline.sources.tiny_unet import make_tiny_unet
from pipeline.store.schema import StoreMismatchError


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("prediction")
    make_tiny_unet(sample_size=32, seed=0).save_pretrained(root / "unet")
    make_tiny_unet(sample_size=32, seed=1).save_pretrained(root / "other_unet")
    write_image_folder(root / "train", count=3)
    classes = ClassInfo(names=["background", "disc", "square"], ignore_label=255)
    settings = ExtractSettings(steps=[50], blocks=[5, 8, 12], size=32, device="cpu")
    extract_features(root / "unet", root / "train", root / "train.zarr", settings, classes, show_progress=False)
    train_on_store(root / "train.zarr", root / "ensemble", TrainSettings(members=2, max_epochs=3, device="cpu"), show_progress=False)
    images = root / "new"
    images.mkdir()
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(images / "wide.png")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).convert("L").save(images / "grey large.jpg")
    return root


def test_predict_writes_outputs_at_each_images_size(trained, tmp_path):
    summary = predict_folder(trained / "ensemble", trained / "unet", trained / "new", tmp_path, device="cpu", show_progress=False)
    assert summary.images == 2
    labels = np.load(tmp_path / "wide.npy")
    assert labels.shape == (24, 40) and set(np.unique(labels)) <= {0, 1, 2}
    assert np.load(tmp_path / "grey large.npy").shape == (64, 64)
    for suffix in ("mask", "overlay", "uncertainty"):
        assert Image.open(tmp_path / f"wide_{suffix}.png").size == (40, 24)
    report = json.loads((tmp_path / "summary.json").read_text())
    wide = next(image for image in report["images"] if image["name"] == "wide")
    assert (wide["width"], wide["height"]) == (40, 24) and wide["uncertainty"] >= 0
    assert sum(wide["class_fractions"].values()) == pytest.approx(1.0, abs=1e-5)
    with Image.open(tmp_path / "predictions.png") as overview:  # two rows: image | prediction | uncertainty
        assert overview.width > 300 and overview.height > 300


def test_predict_overview_figure_is_optional(trained, tmp_path):
    predict_folder(trained / "ensemble", trained / "unet", trained / "new", tmp_path, device="cpu",
                   show_progress=False, pictures=0)
    assert (tmp_path / "summary.json").exists() and not (tmp_path / "predictions.png").exists()


def test_predict_refuses_another_checkpoint(trained, tmp_path):
    with pytest.raises(StoreMismatchError, match="checkpoint"):
        predict_folder(trained / "ensemble", trained / "other_unet", trained / "new", tmp_path, device="cpu", show_progress=False)
    assert not (tmp_path / "summary.json").exists()


def test_predict_command(trained, tmp_path):
    arguments = ["--quiet", "predict", "--ensemble", trained / "ensemble", "--checkpoint", trained / "unet",
                 "--images", trained / "new", "--out", tmp_path / "out", "--device", "cpu"]
    result = CliRunner().invoke(main, [str(argument) for argument in arguments])
    assert result.exit_code == 0, result.output
    assert "2 images segmented" in result.output
    arguments[5] = trained / "other_unet"
    result = CliRunner().invoke(main, [str(argument) for argument in arguments])
    assert result.exit_code == 1 and "use the checkpoint the ensemble was trained with" in result.output


def test_pre_annotations_close_the_labeling_loop(trained, tmp_path):
    """predict --format png --format coco → a person corrects a mask → extract --coco relabels the
    store's finished image, its features kept and its checksum renewed."""
    from pipeline.data.coco import label_maps_to_coco, read_coco
    from pipeline.data.folders import resize_nearest
    from pipeline.store.reader import FeatureStore

    runner = CliRunner()
    result = runner.invoke(main, [str(argument) for argument in [
        "--quiet", "predict", "--ensemble", trained / "ensemble", "--checkpoint", trained / "unet", "--images",
        trained / "new", "--out", tmp_path / "out", "--device", "cpu", "--format", "png", "--format", "coco"]])
    assert result.exit_code == 0, result.output
    predicted = np.load(tmp_path / "out" / "wide.npy")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "wide_labels.png")), predicted)
    coco = read_coco(tmp_path / "out" / "annotations.json")
    assert {image["file_name"] for image in coco["images"]} == {"wide.png", "grey large.jpg"}

    settings = ExtractSettings(steps=[50], blocks=[5, 8, 12], size=32, device="cpu")
    extract_features(trained / "unet", trained / "new", tmp_path / "new.zarr", settings, show_progress=False,
                     coco=tmp_path / "out" / "annotations.json")
    store = FeatureStore(tmp_path / "new.zarr")
    wide = store.schema.image_names.index("wide")
    assert store.class_info().names == ["background", "disc", "square"]
    assert np.array_equal(store.labels(wide), resize_nearest(predicted, (32, 32)))
    features_before = store.image_features(wide)

    corrected = predicted.copy()
    corrected[:, :10] = 2  # a person paints the left edge `square`
    grey = np.load(tmp_path / "out" / "grey large.npy")
    (tmp_path / "corrected.json").write_text(json.dumps(
        label_maps_to_coco([("wide.png", corrected), ("grey large.jpg", grey)], store.class_info())))
    summary = extract_features(trained / "unet", trained / "new", tmp_path / "new.zarr", settings,
                               show_progress=False, coco=tmp_path / "corrected.json")
    store = FeatureStore(tmp_path / "new.zarr")
    assert summary.images_written == 0  # nothing computed again
    assert np.array_equal(store.labels(wide), resize_nearest(corrected, (32, 32)))
    assert np.array_equal(store.image_features(wide), features_before)
    assert store.damaged_images() == []  # the new checksum covers the new labels
