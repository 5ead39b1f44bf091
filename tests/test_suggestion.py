"""Which images to label next: ranked by the ensemble's uncertainty, optionally spread out."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli import main
from conftest import write_image_folder
from pipeline.config import ExtractSettings, TrainSettings
from pipeline.data.coco import coco_to_label_maps, read_coco
from pipeline.data.folders import ClassInfo
from pipeline.extraction.extract import extract_features
from pipeline.heads.pixel_ensemble.training import train_on_store
from pipeline.store.reader import FeatureStore
from pipeline.store.writer import open_store_for_writing
from pipeline.suggestion import choose_images, suggest_images

CLASSES = ClassInfo(names=["background", "disc", "square"], ignore_label=255)


def test_uncertainty_takes_the_most_uncertain_and_random_follows_its_seed():
    uncertainty = np.array([0.1, 0.9, 0.5, 0.7])
    embeddings = np.zeros((4, 2))
    assert choose_images(uncertainty, embeddings, 2, "uncertainty") == [1, 3]
    assert choose_images(uncertainty, embeddings, 9, "uncertainty") == [1, 3, 2, 0]  # all there are
    drawn = choose_images(uncertainty, embeddings, 3, "random", seed=4)
    assert drawn == choose_images(uncertainty, embeddings, 3, "random", seed=4) and len(set(drawn)) == 3
    with pytest.raises(ValueError, match="unknown strategy"):
        choose_images(uncertainty, embeddings, 2, "loudest")


def test_diverse_does_not_take_near_duplicates():
    # Three near-copies of one image are the most uncertain; two other kinds of image follow.
    embeddings = np.array([[0.0, 0.0], [0.01, 0.0], [0.0, 0.01], [5.0, 0.0], [0.0, 5.0], [5.0, 5.0], [9.0, 9.0]])
    uncertainty = np.array([0.90, 0.89, 0.88, 0.80, 0.79, 0.10, 0.05])
    assert choose_images(uncertainty, embeddings, 2, "uncertainty") == [0, 1]
    # The most uncertain, then the farthest from it of the more uncertain half (images 0-3).
    assert choose_images(uncertainty, embeddings, 2, "diverse") == [0, 3]
    assert choose_images(uncertainty, embeddings, 5, "diverse")[:3] == [0, 3, 4]  # a pool of at least the count


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("suggestion")
    from pipeline.sources.tiny_unet import make_tiny_unet

    make_tiny_unet(sample_size=32, seed=0).save_pretrained(root / "unet")
    write_image_folder(root / "train", count=3)
    write_image_folder(root / "pool", count=5, labeled=False, seed=3)
    settings = ExtractSettings(steps=[50], blocks=[5, 8, 12], size=32, device="cpu")
    extract_features(root / "unet", root / "train", root / "train.zarr", settings, CLASSES, show_progress=False)
    extract_features(root / "unet", root / "pool", root / "pool.zarr", settings, show_progress=False)
    train_on_store(root / "train.zarr", root / "ensemble", TrainSettings(members=3, max_epochs=2, device="cpu"),
                   show_progress=False)
    return root


def test_suggest_ranks_the_pool_and_writes_pictures_and_pre_annotations(workspace, tmp_path):
    suggestion = suggest_images(workspace / "ensemble", workspace / "pool.zarr", tmp_path / "out", 2,
                                strategy="uncertainty", formats=("png", "coco"), show_progress=False)
    ranking = json.loads((tmp_path / "out" / "ranking.json").read_text())
    scores = [row["uncertainty"] for row in ranking["images"]]
    assert len(scores) == 5 and scores == sorted(scores, reverse=True)
    assert ranking["chosen"] == suggestion.chosen == [row["name"] for row in ranking["images"][:2]]
    assert Image.open(tmp_path / "out" / "suggestions.png").height > 200
    first = suggestion.chosen[0]
    mask = np.asarray(Image.open(tmp_path / "out" / f"{first}_labels.png"))
    assert mask.shape == (32, 32) and set(np.unique(mask)) <= {0, 1, 2}
    coco = read_coco(tmp_path / "out" / "annotations.json")
    shapes = {path.name: (32, 32) for path in (workspace / "pool").glob("*.png")}
    labels = coco_to_label_maps(coco, "annotations.json", shapes, CLASSES)  # matched to the folder's files by name
    assert np.array_equal(labels[f"{first}.png"], mask)


def test_suggest_refuses_an_empty_store_and_writes_nothing(workspace, tmp_path):
    schema = FeatureStore(workspace / "pool.zarr").schema
    open_store_for_writing(tmp_path / "empty.zarr", schema)  # created, no image finished
    with pytest.raises(ValueError, match="holds no finished image"):
        suggest_images(workspace / "ensemble", tmp_path / "empty.zarr", tmp_path / "out", 2, show_progress=False)
    with pytest.raises(ValueError, match="count must be at least 1"):
        suggest_images(workspace / "ensemble", workspace / "pool.zarr", tmp_path / "out", 0, show_progress=False)
    assert not (tmp_path / "out").exists()


def test_suggest_command(workspace, tmp_path):
    result = CliRunner().invoke(main, [str(argument) for argument in [
        "--quiet", "suggest", "--ensemble", workspace / "ensemble", "--store", workspace / "pool.zarr", "--count", 3,
        "--out", tmp_path / "out", "--strategy", "diverse"]])
    assert result.exit_code == 0, result.output
    assert "suggest: label next" in result.output and "diverse, of 5 images" in result.output
    assert json.loads((tmp_path / "out" / "ranking.json").read_text())["strategy"] == "diverse"
