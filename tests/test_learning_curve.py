"""Learning curves: test mIoU against the number of labeled images, per feature source."""

import json

import pytest
from PIL import Image

from conftest import write_learnable_store
from pipeline.config import LearningCurveSettings, TrainSettings
from pipeline.evaluation.learning_curve import CurveSource, draws_of_images, learning_curve, write_learning_curve


def test_draws_are_seeded_distinct_and_whole_budgets_drawn_once():
    draws = draws_of_images(list(range(10)), 3, 4, seed=0)
    assert len(draws) == 4 and all(len(images) == 3 == len(set(images)) for images in draws)
    assert draws == draws_of_images(list(range(10)), 3, 4, seed=0) != draws_of_images(list(range(10)), 3, 4, seed=1)
    assert draws_of_images([4, 7], 5, 3, seed=0) == [[4, 7]]


def test_a_curve_per_source_on_the_same_draws(tmp_path):
    write_learnable_store(tmp_path / "train.zarr", count=4, seed=0, noise=0.5)
    write_learnable_store(tmp_path / "test.zarr", count=2, seed=1, noise=0.5)
    sources = {
        "label tap": CurveSource(tmp_path / "train.zarr", tmp_path / "test.zarr"),
        "no label tap": CurveSource(tmp_path / "train.zarr", tmp_path / "test.zarr", blocks=[5]),
    }
    settings = LearningCurveSettings(budgets=[1, 4], draws=2, members=2)
    train = TrainSettings(device="cpu", fast_min_steps=60, threads=1)
    curve = learning_curve(sources, settings, train, show_progress=False)
    for source in curve["sources"].values():
        assert [row["budget"] for row in source["by_budget"]] == [1, 4]
        assert [row["draws"] for row in source["by_budget"]] == [2, 1]  # 4 images: every draw the same
        assert set(source["by_budget"][0]["per_class_iou_mean"]) == {"background", "round", "square"}
    images = [[point["images"] for point in source["points"]] for source in curve["sources"].values()]
    assert images[0] == images[1]  # both sources trained on the same images
    with_labels, without = (curve["sources"][name]["by_budget"][-1]["miou_mean"] for name in sources)
    assert with_labels > 0.8 > without + 0.3
    write_learning_curve(curve, tmp_path / "curve.json", tmp_path / "curve.png")
    assert json.loads((tmp_path / "curve.json").read_text())["budgets"] == [1, 4]
    assert Image.open(tmp_path / "curve.png").width > 500


def test_sources_of_other_images_are_refused(tmp_path):
    write_learnable_store(tmp_path / "a.zarr", count=3, seed=0)
    write_learnable_store(tmp_path / "b.zarr", count=2, seed=0)
    sources = {"a": CurveSource(tmp_path / "a.zarr", tmp_path / "a.zarr"),
               "b": CurveSource(tmp_path / "b.zarr", tmp_path / "b.zarr")}
    with pytest.raises(ValueError, match="other images than the first source"):
        learning_curve(sources, LearningCurveSettings(budgets=[1], draws=1, members=1),
                       TrainSettings(device="cpu", fast_min_steps=5), show_progress=False)


def test_learning_curve_command(tmp_path):
    from click.testing import CliRunner

    from cli import main

    write_learnable_store(tmp_path / "train.zarr", count=3, seed=0, noise=0.5)
    write_learnable_store(tmp_path / "test.zarr", count=2, seed=1, noise=0.5)
    result = CliRunner().invoke(main, [str(argument) for argument in [
        "--quiet", "learning-curve", "--train", tmp_path / "train.zarr", "--test", tmp_path / "test.zarr", "--out",
        tmp_path / "curve", "--budgets", "1,3", "--draws", 2, "--members", 2, "--blocks", "decoder.12", "--device", "cpu"]])
    assert result.exit_code == 0, result.output
    assert "1 images" in result.output and "3 images" in result.output
    assert json.loads((tmp_path / "curve" / "learning_curve.json").read_text())["sources"]["features"]["by_budget"][1]["draws"] == 1
