"""The benchmark end to end on a tiny UNet and generated images, and on the real datasets' format."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from conftest import write_image_folder
from pipeline.benchmark import (
    choose_preset,
    format_report,
    plus_minus,
    protocol_images,
    run_benchmark,
    summarise_seeds,
    summary_line,
)
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
    markdown = (tmp_path / "report.md").read_text()
    assert "| paper" not in markdown and "paper:" not in summary_line(report)  # no paper number: no paper row
    assert markdown.count("±") == 1 and "None" not in markdown  # two seeds: ours with a spread
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
        "--device", "cpu", "--learning-curve", "1,2", "--curve-draws", "2",
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "benchmark tiny: mIoU" in result.output and "(paper: 50.0 ± 1.0 %)" in result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["images"] == {"train": 2, "test": 1} and report["difference_to_paper"] is not None
    # The learning curve on the same stores: 1 image (2 draws), both (once).
    assert [(row["budget"], row["draws"]) for row in report["learning_curve"]] == [(1, 2), (2, 1)]
    assert (tmp_path / "run" / "learning_curve.png").is_file()


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
    assert report["miou_percent"]["std"] is None and report["paper_miou_percent"] == {"mean": None, "std": None}
    markdown = (tmp_path / "run" / "report.md").read_text()
    assert "±" not in markdown and "None" not in markdown and "| paper" not in markdown  # one seed, no paper number


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


@pytest.mark.parametrize("summary, text", [
    ({"mean": 71.3, "std": 0.44}, "71.3 ± 0.4 %"),
    ({"mean": 71.34, "std": None}, "71.3 %"),  # one seed, or a paper number without a spread
    ({"mean": None, "std": None}, None),  # no figure
])
def test_a_figure_shows_its_spread_only_where_there_is_one(summary, text):
    assert plus_minus(summary, " %") == text


def _report(seeds: list[int], paper: dict) -> dict:
    """A report as run_benchmark writes it, with the given seeds (mIoU 71.3 %, 71.9 %, …) and paper figure."""
    miou = summarise_seeds([0.713 + 0.006 * index for index in range(len(seeds))])
    return {
        "preset": "ffhq_34", "description": "FFHQ-34", "checkpoint": "ffhq.pt", "checkpoint_sha256": "0123456789abcdef",
        "paper_checkpoint": "ffhq.pt" if paper["mean"] is not None else None, "images": {"train": 20, "test": 20},
        "features": {"feature_dim": 8448, "image_size": 256}, "protocol": "paper", "iou_definition": "paper",
        "train_settings": {"members": 10, "max_epochs": 100, "batch_size": 64}, "preset_overrides": {},
        "seeds": seeds, "miou_percent": miou, "paper_miou_percent": paper,
        "seconds": {"total": 60.0, "extract_train": 10.0, "extract_test": 10.0, "train": [20.0], "evaluate": [5.0]},
        "peak_memory_megabytes": {"total": 900.0}, "store_megabytes": {"train": 128.0, "test": 128.0},
        "per_class_iou_percent": {"background": 90.0, "hair": None},
    }


def test_a_one_seed_report_without_a_paper_number_shows_neither_spread_nor_paper():
    report = _report([0], {"mean": None, "std": None})
    for text in (summary_line(report), format_report(report)):
        assert "71.3 %" in text or "| 71.3 |" in text
        assert "±" not in text and "None" not in text and "paper:" not in text and "| paper" not in text
    assert summary_line(report) == "benchmark ffhq_34: mIoU 71.3 % over seeds [0] in 60.0 s, peak memory 900.0 MB"


def test_a_paper_number_without_a_spread_is_shown_without_one():
    report = _report([0], {"mean": 59.1, "std": None})
    assert "(paper: 59.1 %)" in summary_line(report) and "| paper (checkpoint ffhq.pt) | 59.1 |" in format_report(report)
    assert "±" not in summary_line(report) + format_report(report)


def test_a_two_seed_report_with_a_paper_number_shows_both_spreads_and_the_paper():
    report = _report([0, 1], {"mean": 59.1, "std": 1.4})
    assert summary_line(report).startswith("benchmark ffhq_34: mIoU 71.6 ± 0.4 % over seeds [0, 1] (paper: 59.1 ± 1.4 %)")
    markdown = format_report(report)
    assert "| 71.6 ± 0.4 |" in markdown and "| paper (checkpoint ffhq.pt) | 59.1 ± 1.4 |" in markdown
    assert "None" not in markdown


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


def test_the_datasetddpm_variant_adds_a_segmenter_per_seed_to_the_report(dataset, tmp_path):
    result = CliRunner().invoke(main, [
        "--quiet", "benchmark", "--data", str(dataset / "data"), "--checkpoint", str(dataset / "unet"), "--out", str(tmp_path),
        "--size", "32", "--steps", "50,150", "--blocks", "5,8,12", "--members", "2", "--max-epochs", "2", "--seeds", "0",
        "--device", "cpu", "--variant", "datasetddpm", "--synthetic-count", "10", "--sampler", "ddim", "--sampling-steps", "2",
        "--segmenter", "unet",
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    synthetic = report["datasetddpm"]
    assert 0 <= synthetic["miou_percent"]["mean"] <= 100 and set(synthetic["per_class_iou_percent"]) == set(CLASSES["names"])
    assert synthetic["runs"][0]["samples"] == 10 and synthetic["runs"][0]["kept"] == 9
    assert synthetic["segmenter_settings"]["architecture"] == "unet" and synthetic["paper_miou_percent"]["mean"] is None
    assert (tmp_path / "seed_0" / "segmenter" / "model.onnx").is_file()
    assert "DatasetDDPM: unet trained on 9 of 10 labeled samples" in (tmp_path / "report.md").read_text()


def test_the_paper_presets_carry_the_datasetddpm_row():
    assert [load_preset(name).paper_datasetddpm_miou for name in ("bedroom_28", "ffhq_34", "cat_15", "horse_21")] == [
        47.9, 56.0, 47.6, 60.8]
