"""The command line, end to end, through click's CliRunner."""

import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli import main
from conftest import write_image_folder
from pipeline.sources.tiny_unet import make_tiny_unet

CLASSES = {"names": ["background", "disc", "square"], "ignore_label": 255}


def invoke(*arguments):
    result = CliRunner().invoke(main, ["--quiet", *map(str, arguments)], catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    make_tiny_unet(sample_size=32, seed=0).save_pretrained(root / "unet")
    for split, count, seed in (("train", 4, 0), ("test", 3, 1)):
        write_image_folder(root / "data" / split, count=count, seed=seed)
    (root / "data" / "classes.json").write_text(json.dumps(CLASSES))
    return root


def test_help_lists_every_command():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("extract", "train", "evaluate", "inspect"):
        assert command in result.output


@pytest.fixture(scope="module")
def trained(workspace):
    """extract (train and test), train and evaluate through the CLI, once for this module."""
    common = ["--checkpoint", workspace / "unet", "--steps", "50,150", "--blocks", "5,8,12", "--size", "32"]
    outputs = {}
    for split in ("train", "test"):
        store = workspace / f"{split}.zarr"
        outputs[f"extract_{split}"] = invoke("extract", *common, "--images", workspace / "data" / split, "--store", store)
    outputs["train"] = invoke(
        "train", "--store", workspace / "train.zarr", "--out", workspace / "ensemble", "--members", 2, "--max-epochs", 6
    )
    outputs["evaluate"] = invoke(
        "evaluate", "--ensemble", workspace / "ensemble", "--store", workspace / "test.zarr", "--out", workspace / "results"
    )
    return outputs


def test_extract_train_evaluate(workspace, trained):
    for name, result in trained.items():
        assert result.exit_code == 0, f"{name}: {result.output}"
    assert "3 of 3 images written" in trained["extract_test"].output
    assert (workspace / "ensemble" / "ensemble.json").is_file()
    metrics = json.loads((workspace / "results" / "metrics.json").read_text())
    assert set(metrics) >= {"miou", "per_class_iou", "pixel_accuracy", "mean_uncertainty"}
    assert set(metrics["per_class_iou"]) == {"background", "disc", "square"}
    assert 0.0 <= metrics["miou"] <= 1.0 and metrics["images"] == 3
    mask = np.load(workspace / "results" / "masks" / "img_000.npy")
    assert mask.shape == (32, 32) and set(np.unique(mask)) <= {0, 1, 2}
    assert Image.open(workspace / "results" / "masks" / "img_000.png").size == (32, 32)
    assert Image.open(workspace / "results" / "predictions.png").size[0] > 200


def test_rectangular_images_extract_train_evaluate_and_predict_at_their_own_size(tmp_path):
    """64×48 (W×H) images with label maps, resized to 48×32 keeping their aspect ratio, end to end:
    every mask comes back 64 wide and 48 high."""
    make_tiny_unet(sample_size=32, seed=0).save_pretrained(tmp_path / "unet")
    for split, count, seed in (("train", 3, 0), ("test", 2, 1)):
        write_image_folder(tmp_path / "data" / split, count=count, size=(48, 64), seed=seed)
    (tmp_path / "data" / "classes.json").write_text(json.dumps(CLASSES))
    common = ["--checkpoint", tmp_path / "unet", "--steps", "50", "--blocks", "5,12"]
    extracted = invoke("extract", *common, "--size", "32,48", "--images", tmp_path / "data" / "train",
                       "--store", tmp_path / "train.zarr")
    assert extracted.exit_code == 0, extracted.output
    assert "at 48×32" in extracted.output
    # The rule keeps the aspect ratio: the shorter side 48 → 32, the other 64 → 42.7, rounded to 48 (3 × 16).
    by_rule = invoke("extract", *common, "--resize", "shorter:32", "--images", tmp_path / "data" / "test",
                     "--store", tmp_path / "test.zarr")
    assert by_rule.exit_code == 0, by_rule.output
    from pipeline.store.reader import FeatureStore

    test_store = FeatureStore(tmp_path / "test.zarr")
    assert test_store.image_shape == (32, 48) and test_store.group["labels"].shape == (2, 32, 48)
    assert test_store.schema.original_shape(1) == (48, 64)
    explicit = invoke("extract", *common, "--size", "32,48", "--images", tmp_path / "data" / "test",
                      "--store", tmp_path / "test-explicit.zarr")
    assert explicit.exit_code == 0, explicit.output
    ys, xs = np.array([0, 31, 20, 5]), np.array([0, 47, 40, 44])  # corners and the wide part
    np.testing.assert_array_equal(test_store.pixel_features(1, ys, xs),
                                  FeatureStore(tmp_path / "test-explicit.zarr").pixel_features(1, ys, xs))
    trained = invoke("train", "--store", tmp_path / "train.zarr", "--out", tmp_path / "ensemble", "--members", 2,
                     "--max-epochs", 3)
    assert trained.exit_code == 0, trained.output
    evaluated = invoke("evaluate", "--ensemble", tmp_path / "ensemble", "--store", tmp_path / "test.zarr",
                       "--out", tmp_path / "results")
    assert evaluated.exit_code == 0, evaluated.output
    assert np.load(tmp_path / "results" / "masks" / "img_000.npy").shape == (48, 64)
    assert Image.open(tmp_path / "results" / "masks" / "img_000.png").size == (64, 48)
    predicted = invoke("predict", "--ensemble", tmp_path / "ensemble", "--checkpoint", tmp_path / "unet",
                       "--images", tmp_path / "data" / "test", "--out", tmp_path / "predicted")
    assert predicted.exit_code == 0, predicted.output
    assert np.load(tmp_path / "predicted" / "img_001.npy").shape == (48, 64)
    assert Image.open(tmp_path / "predicted" / "img_001_mask.png").size == (64, 48)
    # predict and evaluate label the same image alike (one resizes the input, the other reads the store).
    agreement = (np.load(tmp_path / "predicted" / "img_001.npy") == np.load(tmp_path / "results" / "masks" / "img_001.npy"))
    assert agreement.mean() > 0.95
    inspected = invoke("inspect", "--store", tmp_path / "test.zarr")
    assert "48×32" in inspected.output


def test_a_size_the_model_cannot_take_and_a_bad_rule_are_refused_clearly(workspace):
    common = ["--checkpoint", workspace / "unet", "--steps", "50", "--blocks", "12", "--images", workspace / "data" / "test"]
    odd = invoke("extract", *common, "--size", "40,60", "--store", workspace / "odd.zarr")
    assert odd.exit_code != 0 and "multiples of 16" in odd.output and "--resize" in odd.output
    rule = invoke("extract", *common, "--resize", "wider:32", "--store", workspace / "rule.zarr")
    assert rule.exit_code != 0 and "shorter:N or longer:N" in rule.output
    assert not (workspace / "odd.zarr").exists() and not (workspace / "rule.zarr").exists()


def test_inspect(workspace, trained):
    summary = json.loads(invoke("inspect", "--store", workspace / "test.zarr", "--json").output)
    assert summary["images"] == {"total": 3, "done": 3}
    assert summary["steps"] == [50, 150] and [tap["name"] for tap in summary["taps"]] == [
        "up_blocks.1.upsamplers.0", "up_blocks.2.upsamplers.0", "up_blocks.4.resnets.0"]
    assert summary["classes"] == CLASSES and summary["disk_bytes"] > 0
    text = invoke("inspect", "--store", workspace / "test.zarr").output
    assert "layout      native" in text and "3 of 3 done" in text
    by_name = invoke("inspect", "--store", workspace / "test.zarr", "--image", "img_001", "--pixel", 3, 4, "--json")
    by_index = invoke("inspect", "--store", workspace / "test.zarr", "--image", 1, "--pixel", 3, 4, "--json")
    features = json.loads(by_name.output)["features"]
    assert len(features) == summary["feature_dim"] and features == json.loads(by_index.output)["features"]


def test_evaluating_with_an_ensemble_of_other_features_is_refused(workspace, trained, tmp_path):
    result = invoke(
        "extract", "--checkpoint", workspace / "unet", "--steps", "50", "--blocks", "5,8,12", "--size", "32",
        "--images", workspace / "data" / "test", "--store", tmp_path / "other.zarr",
    )
    assert result.exit_code == 0, result.output
    result = invoke("evaluate", "--ensemble", workspace / "ensemble", "--store", tmp_path / "other.zarr", "--out", tmp_path / "out")
    assert result.exit_code == 1
    assert "was trained on steps [50, 150]" in result.output and "no step [150]" in result.output


def test_clear_errors_without_tracebacks(tmp_path):
    result = invoke("extract", "--checkpoint", tmp_path / "missing.pt", "--images", tmp_path, "--store", tmp_path / "s.zarr")
    assert result.exit_code == 1 and "Traceback" not in result.output
    result = invoke("inspect", "--store", tmp_path / "nothing.zarr")
    assert result.exit_code == 1 and "no feature store" in result.output
    result = invoke("extract", "--checkpoint", tmp_path, "--images", tmp_path, "--store", tmp_path / "s.zarr", "--steps", "5,x")
    assert result.exit_code == 2 and "comma-separated integers" in result.output


def test_golden_adm_fixture_through_the_cli(shared_dir, tmp_path):
    """The fixture's pixel features, reproduced by `extract` + `inspect --pixel` (the issue's check)."""
    fixture = shared_dir / "fixtures" / "adm-tiny"
    expected = np.load(fixture / "adm_tiny_expected.npz")
    image = np.round((expected["image"].transpose(1, 2, 0) + 1.0) * 127.5).astype(np.uint8)  # exact
    (tmp_path / "images").mkdir()
    Image.fromarray(image).save(tmp_path / "images" / "face.png")
    result = invoke(
        "extract", "--checkpoint", fixture / "adm_tiny.pt", "--images", tmp_path / "images",
        "--store", tmp_path / "store.zarr", "--seed", 2, "--size", 64,
    )
    assert result.exit_code == 0, result.output
    for row in (0, 17, 101, 255):
        y, x = expected["pixel_yx"][row]
        output = invoke("inspect", "--store", tmp_path / "store.zarr", "--image", 0, "--pixel", y, x, "--json").output
        features = np.array(json.loads(output)["features"])
        assert features.shape == (1056,)
        # The store keeps float16: agreement to fp16 rounding of the fp32 reference.
        np.testing.assert_allclose(features, expected["pixel_features"][row], rtol=2e-3, atol=2e-3)


def test_inspect_verify(workspace, trained, tmp_path):
    import shutil

    result = invoke("inspect", "--store", workspace / "test.zarr", "--verify")
    assert result.exit_code == 0 and "all 3 finished images" in result.output
    copy = tmp_path / "copy.zarr"
    shutil.copytree(workspace / "test.zarr", copy)
    chunk = next(path for path in (copy / "taps" / "up_blocks.4.resnets.0" / "c" / "2").rglob("*") if path.is_file())
    chunk.write_bytes(chunk.read_bytes()[:-7] + b"garbage")
    result = invoke("inspect", "--store", copy, "--verify")
    assert result.exit_code == 1 and "1 of 3 images" in result.output and "img_002" in result.output


def test_inspect_lists_a_checkpoints_taps(workspace):
    result = invoke("inspect", "--checkpoint", workspace / "unet", "--taps", "--json")
    assert result.exit_code == 0, result.output
    taps = {tap["name"]: tap for tap in json.loads(result.output)}
    assert taps["up_blocks.4.resnets.0"]["block"] == 12 and taps["up_blocks.4.resnets.0"]["height"] == 32
    assert "block 12" in invoke("inspect", "--checkpoint", workspace / "unet", "--taps", "--size", 64).output
    assert invoke("inspect", "--taps").exit_code == 2  # a usage error: no checkpoint


def test_inspect_pictures_stats_and_export(workspace, trained, tmp_path):
    store = workspace / "test.zarr"
    assert invoke("inspect", "--store", store, "--image", 0, "--pca", tmp_path / "pca.png").exit_code == 0
    result = invoke("inspect", "--store", store, "--image", 0, "--similarity", 5, 6, tmp_path / "sim.png", "--compare-with", "img_001")
    assert result.exit_code == 0 and (tmp_path / "sim.png").stat().st_size > 5000
    result = invoke("inspect", "--store", store, "--image", 1, "--pixel", 0, 0, "--pixel", 4, 4, "--export", tmp_path / "f.npy")
    assert result.exit_code == 0 and np.load(tmp_path / "f.npy").shape[0] == 2
    stats = json.loads(invoke("inspect", "--store", store, "--stats", "--json").output)["tap_statistics"]
    taps = ["up_blocks.1.upsamplers.0", "up_blocks.2.upsamplers.0", "up_blocks.4.resnets.0"]
    assert [row["features"] for row in stats] == [f"t{step} {tap}" for step in (50, 150) for tap in taps]
    assert invoke("inspect", "--store", store, "--pca", tmp_path / "x.png").exit_code == 2  # needs --image


def _corrupt_folder(root):
    folder = write_image_folder(root / "corrupt", count=2, seed=0)
    broken = sorted(folder.glob("*.png"))[0]
    broken.write_bytes(broken.read_bytes()[:100])
    return folder


def _store_of_another_model(workspace, root):
    """A store extracted with another UNet, at the path the next extract is pointed to."""
    make_tiny_unet(sample_size=32, seed=5).save_pretrained(root / "other_unet")
    result = invoke(
        "extract", "--checkpoint", root / "other_unet", "--steps", "50,150", "--blocks", "5,8,12", "--size", "32",
        "--images", workspace / "data" / "test", "--store", root / "taken.zarr",
    )
    assert result.exit_code == 0, result.output
    return root / "taken.zarr"


def _full_disk(monkeypatch):
    import errno

    from pipeline.store.writer import FeatureStoreWriter

    def no_space(*arguments, **keywords):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(FeatureStoreWriter, "write_image", no_space)


# Issue 6's list of errors a person must understand: (case, what to run, text the message must hold).
ERROR_CASES = ["missing checkpoint", "no images", "corrupt image", "store of another model", "full disk"]


@pytest.mark.parametrize("case", ERROR_CASES)
def test_errors_are_one_clear_message_naming_the_file(workspace, tmp_path, monkeypatch, case):
    images, store, checkpoint = workspace / "data" / "test", tmp_path / "store.zarr", workspace / "unet"
    if case == "missing checkpoint":
        checkpoint, expected = tmp_path / "missing.pt", [str(tmp_path / "missing.pt"), "not found"]
    elif case == "no images":
        images = tmp_path / "empty"
        images.mkdir()
        expected = [str(images), "no PNG or JPEG images"]
    elif case == "corrupt image":
        images = _corrupt_folder(tmp_path)
        expected = [str(images / "img_000.png"), "cannot read image"]
    elif case == "store of another model":
        store = _store_of_another_model(workspace, tmp_path)
        expected = [str(store), "checkpoint_sha256", "Choose another --store"]
    else:
        _full_disk(monkeypatch)
        expected = ["disk full", str(store), "re-run extract"]
    result = invoke(
        "extract", "--checkpoint", checkpoint, "--steps", "50,150", "--blocks", "5,8,12", "--size", "32",
        "--images", images, "--store", store,
    )
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.output.startswith("Error: ")
    for text in expected:
        assert text in result.output, (text, result.output)
    if case != "store of another model":
        assert not store.exists() or case == "full disk"  # nothing written that looks valid


def test_verbose_shows_the_traceback(tmp_path):
    result = CliRunner().invoke(
        main, ["--verbose", "extract", "--checkpoint", str(tmp_path / "missing.pt"), "--images", str(tmp_path),
               "--store", str(tmp_path / "s.zarr")],
    )
    assert result.exit_code == 1 and isinstance(result.exception, ValueError)  # raised, not summarised
    assert "no PNG or JPEG images" in str(result.exception)


def test_train_on_a_subset_of_the_stores_steps_and_taps(workspace, trained, tmp_path):
    result = invoke("train", "--store", workspace / "train.zarr", "--out", tmp_path / "subset", "--members", 1,
                    "--max-epochs", 1, "--steps", 150, "--blocks", "12,up_blocks.1.upsamplers.0")
    assert result.exit_code == 0, result.output
    features = json.loads((tmp_path / "subset" / "ensemble.json").read_text())["features"]
    assert features["steps"] == [150] and features["taps"] == ["up_blocks.1.upsamplers.0", "up_blocks.4.resnets.0"]
    result = invoke("evaluate", "--ensemble", tmp_path / "subset", "--store", workspace / "test.zarr", "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output


def test_synthesize_train_segmenter_evaluate_and_predict_without_a_checkpoint(workspace, trained, tmp_path):
    """DatasetDDPM through the CLI: samples labeled by the ensemble → a segmenter → evaluate and predict."""
    synthetic, segmenter = tmp_path / "synthetic", tmp_path / "segmenter"
    result = invoke("synthesize", "--checkpoint", workspace / "unet", "--ensemble", workspace / "ensemble", "--count", 10,
                    "--sampler", "ddim", "--sampling-steps", 3, "--batch-size", 5, "--out", synthetic)
    assert result.exit_code == 0, result.output
    assert "10 samples (10 drawn now), 9 kept" in result.output
    result = invoke("train-segmenter", "--images", synthetic, "--validation", workspace / "data" / "train", "--out", segmenter,
                    "--epochs", 2, "--batch-size", 4)
    assert result.exit_code == 0, result.output
    assert (segmenter / "model.onnx").is_file() and (segmenter / "segmenter.json").is_file()
    result = invoke("evaluate", "--ensemble", segmenter, "--store", workspace / "test.zarr", "--out", tmp_path / "results")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "results" / "metrics.json").read_text())
    assert metrics["images"] == 3 and set(metrics["per_class_iou"]) == set(CLASSES["names"])
    assert metrics["mean_uncertainty"] is None and (tmp_path / "results" / "masks" / "img_000.png").is_file()
    result = invoke("predict", "--ensemble", segmenter, "--images", workspace / "data" / "test", "--out", tmp_path / "predicted")
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "predicted" / "img_000.npy").shape == (32, 32)
    assert json.loads((tmp_path / "predicted" / "summary.json").read_text())["checkpoint"] is None


def test_synthesize_refusals_are_one_clear_message(workspace, trained, tmp_path):
    result = invoke("synthesize", "--checkpoint", workspace / "unet", "--count", 0, "--ensemble", workspace / "ensemble",
                    "--out", tmp_path / "out")
    assert result.exit_code == 1 and "count must be at least 1" in result.output and not (tmp_path / "out").exists()
    result = invoke("synthesize", "--checkpoint", workspace / "unet", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "--unlabeled" in result.output
    write_image_folder(tmp_path / "unlabeled", count=8, labeled=False)
    (tmp_path / "unlabeled" / "classes.json").write_text(json.dumps(CLASSES))
    result = invoke("train-segmenter", "--images", tmp_path / "unlabeled", "--out", tmp_path / "segmenter")
    assert result.exit_code == 1 and "have no label map" in result.output and not (tmp_path / "segmenter").exists()
    result = invoke("predict", "--ensemble", workspace / "ensemble", "--images", workspace / "data" / "test",
                    "--out", tmp_path / "predicted")
    assert result.exit_code == 1 and "give the --checkpoint" in result.output


def test_fewshot_train_and_evaluate_through_the_cli(workspace, tmp_path):
    """DiffewS through the CLI: 2 folds of {disc, square}; training sees the square, evaluation the disc."""
    result = invoke("fewshot-train", "--checkpoint", workspace / "unet", "--images", workspace / "data" / "train",
                    "--out", tmp_path / "model", "--folds", 2, "--steps", 2, "--batch-size", 2, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "fewshot-train: 2 steps" in result.output and (tmp_path / "model" / "model.safetensors").is_file()
    result = invoke("fewshot-evaluate", "--model", tmp_path / "model", "--images", workspace / "data" / "test",
                    "--out", tmp_path / "scores", "--folds", 2, "--episodes", 3, "--device", "cpu")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "scores" / "metrics.json").read_text())
    assert set(metrics["per_class_iou"]) == {"disc"} and 0.0 <= metrics["miou"] <= 1.0
    result = invoke("fewshot-evaluate", "--model", tmp_path / "model", "--images", workspace / "data" / "test",
                    "--out", tmp_path / "other", "--folds", 2, "--fold", 1, "--episodes", 3, "--device", "cpu")
    assert result.exit_code == 1 and "fold" in result.output
    result = invoke("fewshot-train", "--checkpoint", workspace / "unet", "--images", workspace / "data" / "train",
                    "--out", tmp_path / "random", "--folds", 2, "--steps", 1, "--batch-size", 2, "--device", "cpu",
                    "--random-init", "--trainable", "attention")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "random" / "fewshot.json").read_text())["settings"]
    assert record["random_init"] and record["trainable"] == "attention"
    result = invoke("fewshot-train", "--checkpoint", workspace / "unet", "--images", workspace / "data" / "train",
                    "--out", tmp_path / "named", "--novel-classes", "disc", "--steps", 1, "--batch-size", 2,
                    "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "named" / "fewshot.json").read_text())["fold"]["test_classes"] == ["disc"]
    result = invoke("fewshot-train", "--checkpoint", workspace / "unet", "--images", workspace / "data" / "train",
                    "--out", tmp_path / "weighted", "--folds", 2, "--steps", 1, "--batch-size", 1, "--device", "cpu",
                    "--class-weight", "square=3")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "weighted" / "fewshot.json").read_text())["settings"]["class_weights"] == {"square": 3.0}
    result = invoke("fewshot-train", "--checkpoint", workspace / "unet", "--images", workspace / "data" / "train",
                    "--out", tmp_path / "bad", "--class-weight", "square")
    assert result.exit_code != 0 and "expected NAME=WEIGHT" in result.output


def test_fewshot_predict_segments_a_folder_from_supports_through_the_cli(workspace, tmp_path):
    result = invoke("fewshot-train", "--checkpoint", workspace / "unet", "--images", workspace / "data" / "train",
                    "--out", tmp_path / "model", "--folds", 2, "--steps", 1, "--batch-size", 1, "--device", "cpu")
    assert result.exit_code == 0, result.output
    support = min((workspace / "data" / "train").glob("*.png"))
    result = invoke("fewshot-predict", "--model", tmp_path / "model", "--support", support,
                    "--support-mask", support.with_suffix(".npy"), "--images", workspace / "data" / "test",
                    "--out", tmp_path / "predicted", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "segmented from 1 support(s)" in result.output and "ms a query" in result.output
    assert (tmp_path / "predicted" / "summary.json").is_file() and list((tmp_path / "predicted").glob("*_overlay.png"))
    models = tmp_path / "models" / "pretrained"
    models.mkdir(parents=True)
    (tmp_path / "model").rename(models / "fold-0")
    result = invoke("fewshot-benchmark", "--models", tmp_path / "models", "--checkpoint", workspace / "unet",
                    "--images", workspace / "data" / "test", "--out", tmp_path / "benchmark", "--shots", "1",
                    "--episodes", 2, "--ensemble-steps", 2, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "fewshot-benchmark: 1 fold(s), 2 episodes each: fewshot_miou_1shot" in result.output
    assert (tmp_path / "benchmark" / "fewshot.png").is_file()
    result = invoke("fewshot-predict", "--model", models / "fold-0", "--support", support, "--support", support,
                    "--support-mask", support.with_suffix(".npy"), "--images", workspace / "data" / "test",
                    "--out", tmp_path / "refused")
    assert result.exit_code != 0 and "one --support-mask per --support" in result.output
    assert not (tmp_path / "refused").exists()


def test_a_fewshot_preset_sets_the_protocol_and_checks_the_classes(workspace, tmp_path):
    preset = tmp_path / "two_folds.yaml"
    preset.write_text("name: two_folds\nfolds: 2\nfold_layout: blocks\nepisodes: 2\nimage_size: 16\n"
                      "ignore_label: 255\nnum_classes: 3\n")
    result = invoke("fewshot-baseline", "--baseline", "prototype", "--checkpoint", workspace / "unet", "--images",
                    workspace / "data" / "test", "--out", tmp_path / "scores", "--preset", preset,
                    "--feature-steps", "50", "--feature-blocks", "0", "--device", "cpu")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "scores" / "metrics.json").read_text())
    assert (metrics["episodes"], metrics["folds"], metrics["image_size"]) == (2, 2, 16)
    result = invoke("fewshot-baseline", "--baseline", "prototype", "--checkpoint", workspace / "unet", "--images",
                    workspace / "data" / "test", "--out", tmp_path / "coco", "--preset", "coco_20i", "--device", "cpu")
    assert result.exit_code == 1 and "but coco_20i has 81" in result.output and not (tmp_path / "coco").exists()


def test_fewshot_baselines_through_the_cli(workspace, tmp_path):
    for baseline in ("prototype", "ensemble"):
        result = invoke("fewshot-baseline", "--baseline", baseline, "--checkpoint", workspace / "unet", "--images",
                        workspace / "data" / "test", "--out", tmp_path / baseline, "--folds", 2, "--episodes", 3,
                        "--feature-steps", "50", "--feature-blocks", "0,1", "--members", 2, "--device", "cpu")
        assert result.exit_code == 0, result.output
        metrics = json.loads((tmp_path / baseline / "metrics.json").read_text())
        assert metrics["baseline"] == baseline and set(metrics["per_class_iou"]) == {"disc"} and metrics["episodes"] == 3


def test_every_training_setting_is_a_train_option_with_the_dataclass_default():
    """params.yaml's `train` section and `train`'s options are the same settings, defaults included."""
    from cli import train
    from pipeline.config import TrainSettings

    options = {parameter.name: parameter for parameter in train.params}
    for field in dataclasses.fields(TrainSettings):
        assert field.name in options, f"TrainSettings.{field.name} has no `train` option"
        assert options[field.name].opts == [f"--{field.name.replace('_', '-')}"]
        assert options[field.name].default == field.default, field.name


@pytest.mark.parametrize("command, settings_class", [
    ("refine-train", "RefineSettings"), ("synthesize", "SynthesizeSettings"), ("train-segmenter", "SegmenterSettings"),
])
def test_the_commands_with_a_threads_setting_have_a_threads_option(command, settings_class):
    from pipeline import config

    options = {parameter.name: parameter for parameter in main.commands[command].params}
    default = next(field.default for field in dataclasses.fields(getattr(config, settings_class)) if field.name == "threads")
    assert options["threads"].default == default == 1


def test_train_options_reach_the_settings(monkeypatch, tmp_path):
    from pipeline.heads.pixel_ensemble import training

    received = {}

    def fake_train_on_store(store, out, settings, class_info, show_progress):
        received["settings"] = settings
        raise ValueError("stopped after the settings were built")

    monkeypatch.setattr(training, "train_on_store", fake_train_on_store)
    result = CliRunner().invoke(main, [
        "train", "--store", str(tmp_path / "store"), "--out", str(tmp_path / "out"), "--hidden-widths", "8,4",
        "--patience", "3", "--patience-from-epoch", "1", "--min-class-pixels", "5", "--threads", "2",
        "--buffer-pixels", "1024", "--cache-megabytes", "64", "--fast-epochs", "0.5", "--fast-min-steps", "10",
        "--steps", "50", "--blocks", "5,up_blocks.1",
    ])
    assert result.exit_code == 1 and "stopped after the settings were built" in result.output
    settings = received["settings"]
    assert settings.hidden_widths == [8, 4] and settings.patience == 3 and settings.patience_from_epoch == 1
    assert settings.min_class_pixels == 5 and settings.threads == 2 and settings.buffer_pixels == 1024
    assert settings.cache_megabytes == 64 and settings.fast_epochs == 0.5 and settings.fast_min_steps == 10
    assert settings.steps == [50] and settings.blocks == [5, "up_blocks.1"] and settings.members == 10
