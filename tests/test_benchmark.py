"""The benchmark end to end on a tiny UNet and generated images, and on the real datasets' format."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from conftest import write_image_folder
from pipeline.benchmark import choose_preset, protocol_images, run_benchmark, summarise_seeds
from pipeline.config import EvaluateSettings, ExtractSettings, TrainSettings
from pipeline.data.presets import load_preset
from pipeline.sources.tiny_unet import make_tiny_unet

CLASSES = {"names": ["background", "disc", "square"], "ignore_label": 255, "train": 3, "test": 2}
TINY = {"image_size": 32, "steps": [50, 150], "blocks": [5, 8, 12]}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A dataset in the paper's layout (one image more per split than the protocol uses) and a tiny UNet."""
    root = tmp_path_factory.mktemp("benchmark")
    make_tiny_unet(sample_size=32, seed=0).save_pretrained(root / "unet")
    write_image_folder(root / "data" / "real" / "train", count=4, seed=0)
    write_image_folder(root / "data" / "real" / "test", count=3, seed=1)
    (root / "data" / "classes.json").write_text(json.dumps(CLASSES))
    return root


def test_a_preset_runs_end_to_end_to_a_report(dataset, tmp_path):
    preset, overrides = choose_preset(None, dataset / "data", **TINY)
    assert (preset.train_images, preset.test_images) == (3, 2) and overrides == TINY
    report = run_benchmark(
        preset, dataset / "data", dataset / "unet", tmp_path, ExtractSettings(device="cpu"),
        TrainSettings(members=2, max_epochs=2, device="cpu"), EvaluateSettings(), seeds=[0, 1],
        overrides=overrides, show_progress=False,
    )
    assert report["images"] == {"train": 3, "test": 2} and report["seeds"] == [0, 1]
    assert report["features"]["steps"] == [50, 150] and report["features"]["feature_dim"] > 0
    miou = report["miou_percent"]
    assert 0 <= miou["mean"] <= 100 and miou["std"] is not None and len(miou["per_seed"]) == 2
    assert miou["mean"] == pytest.approx(np.mean(miou["per_seed"]), abs=0.01)
    assert report["paper_miou_percent"] == {"mean": None, "std": None} and report["difference_to_paper"] is None
    assert set(report["per_class_iou_percent"]) == {"background", "disc", "square"}
    assert report["seconds"]["total"] > 0 and report["store_megabytes"]["train"] > 0
    assert report["peak_memory_megabytes"]["total"] is None or report["peak_memory_megabytes"]["total"] > 50
    assert report["preset_overrides"] == TINY and report["images_extracted_in_this_run"] == {"train": 3, "test": 2}
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert "| paper (checkpoint n/a) | n/a |" in (tmp_path / "report.md").read_text()
    # Only the protocol's first images were extracted, in sorted order.
    assert sorted(path.name for path in (tmp_path / "images" / "test").iterdir()) == [
        "img_000.npy", "img_000.png", "img_001.npy", "img_001.png"
    ]
    for seed in (0, 1):
        assert (tmp_path / f"seed_{seed}" / "evaluation" / "metrics.json").is_file()


def test_the_cli_runs_a_named_preset_with_overrides(dataset, tmp_path):
    preset_file = tmp_path / "tiny.yaml"
    preset_file.write_text(
        "name: tiny\nclass_names: [background, disc, square]\nnum_classes: 3\nignore_label: 255\n"
        "train_images: 2\ntest_images: 1\nimage_size: 32\nsteps: [50]\nblocks: [5, 8, 12]\npaper_miou: 50.0\npaper_miou_std: 1.0\n"
    )
    result = CliRunner().invoke(main, [
        "--quiet", "benchmark", "--preset", str(preset_file), "--data", str(dataset / "data"),
        "--checkpoint", str(dataset / "unet"), "--out", str(tmp_path / "run"), "--members", "2", "--max-epochs", "1",
        "--device", "cpu",
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "benchmark tiny: mIoU" in result.output and "(paper: 50.0 ± 1.0 %)" in result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["images"] == {"train": 2, "test": 1} and report["difference_to_paper"] is not None


def test_a_feature_preset_sets_size_steps_taps_and_draws_and_the_command_line_still_wins(dataset, tmp_path):
    features = tmp_path / "two-draws.yaml"
    features.write_text("name: two-draws\nimage_size: 32\nsteps: [50, 150]\nblocks: [5, 12]\nnoise_draws: 2\n")
    result = CliRunner().invoke(main, [
        "--quiet", "benchmark", "--data", str(dataset / "data"), "--features", str(features), "--steps", "100",
        "--checkpoint", str(dataset / "unet"), "--out", str(tmp_path / "run"), "--members", "2", "--max-epochs", "1",
        "--seeds", "0", "--device", "cpu",
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["features"]["steps"] == [100] and report["features"]["blocks"] == [5, 12]
    assert report["features"]["noise_draws"] == 2 and report["preset_overrides"]["features"] == "two-draws"


def test_protocol_breaks_are_refused_with_the_file_named(dataset, tmp_path):
    preset, _ = choose_preset(None, dataset / "data", **TINY)
    with pytest.raises(ValueError, match="holds 4 images but the protocol uses the first 9"):
        protocol_images(dataset / "data", "train", 9, preset)
    broken = tmp_path / "broken"
    write_image_folder(broken / "real" / "test", count=2, seed=3)
    (broken / "real" / "test" / "img_001.npy").unlink()
    with pytest.raises(ValueError, match=r"img_001\.png"):
        protocol_images(broken, "test", 0, preset)
    result = CliRunner().invoke(main, ["--quiet", "benchmark", "--data", str(tmp_path), "--checkpoint", str(tmp_path)])
    assert result.exit_code == 1 and "classes.json" in result.output


def test_seed_summary_is_mean_and_sample_std_in_percent():
    assert summarise_seeds([0.5, 0.6, None]) == {"mean": 55.0, "std": 7.07, "per_seed": [50.0, 60.0, None]}
    assert summarise_seeds([0.5])["std"] is None


@pytest.mark.parametrize("name", ["ffhq_34", "cat_15", "horse_21"])
def test_the_real_datasets_fit_their_presets(shared_dir, name):
    preset = load_preset(name)
    root = shared_dir / "datasets" / "ddpm-seg" / name
    for split, count in (("train", preset.train_images), ("test", preset.test_images)):
        records = protocol_images(root, split, count, preset)
        assert len(records) == count
        assert [record.name for record in records] == sorted(record.name for record in records)


def test_the_dvc_stage_reads_its_params_file(dataset, tmp_path, monkeypatch):
    from stages import benchmark as stage

    preset_file = tmp_path / "tiny.yaml"
    preset_file.write_text(
        "name: tiny\nclass_names: [background, disc, square]\nnum_classes: 3\nignore_label: 255\n"
        "train_images: 2\ntest_images: 1\nimage_size: 32\nsteps: [50]\nblocks: [5, 8, 12]\ncheckpoint: unet\n"
    )
    params = tmp_path / "params.yaml"
    params.write_text(
        f"benchmark:\n  dataset: {preset_file}\n  seeds: [3]\n  test_images: 2\n"
        "extract:\n  device: cpu\ntrain:\n  members: 1\n  max_epochs: 1\n  device: cpu\n"
    )
    monkeypatch.setattr("sys.argv", [
        "benchmark", "--params", str(params), "--data", str(dataset / "data"), "--checkpoints", str(dataset),
        "--out", str(tmp_path / "run"),
    ])
    stage.main()
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["seeds"] == [3] and report["images"] == {"train": 2, "test": 2}
    assert report["preset_overrides"] == {"test_images": 2} and report["train_settings"]["members"] == 1
