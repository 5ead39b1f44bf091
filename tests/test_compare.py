import json

import pytest

from pipeline.evaluation.compare import compare_feature_sources, write_comparison


def test_margins_are_in_points():
    summary = compare_feature_sources({"ddpm": 0.42, "random": 0.30, "pixels": 0.12})
    assert summary == {
        "miou": 0.42, "miou_random_weights": 0.30, "miou_pixels": 0.12,
        "margin_over_random_weights": 12.0, "margin_over_pixels": 30.0,
    }
    with_paper_taps = compare_feature_sources({"ddpm": 0.42, "ddpm_paper_taps": 0.40, "random": 0.30})
    assert with_paper_taps["miou_paper_taps"] == 0.40 and with_paper_taps["margin_over_paper_taps"] == 2.0
    with pytest.raises(ValueError, match="unknown"):
        compare_feature_sources({"dino": 0.5})


def test_write_comparison_reads_metrics_files(tmp_path):
    paths = {}
    for source, miou in (("ddpm", 0.5), ("random", 0.25), ("pixels", 0.125)):
        paths[source] = tmp_path / f"{source}.json"
        per_class = {"background": 0.9, "eye": miou / 2, "nose": None if source == "pixels" else miou}
        paths[source].write_text(json.dumps({"miou": miou, "per_class_iou": per_class}))
    summary = write_comparison(paths, tmp_path / "metrics.json", tmp_path / "chart.png", tmp_path / "per_class.json")
    assert json.loads((tmp_path / "metrics.json").read_text()) == summary
    assert summary["margin_over_pixels"] == 37.5 and (tmp_path / "chart.png").stat().st_size > 1000
    assert summary["lowest_class_iou"] == 0.25  # the DDPM features' eye
    per_class = json.loads((tmp_path / "per_class.json").read_text())
    assert list(per_class) == ["background", "eye", "nose"]
    assert per_class["eye"] == {"ddpm": 0.25, "random": 0.125, "pixels": 0.0625}
    assert per_class["nose"]["pixels"] is None
    paths["pixels"].write_text("{}")
    with pytest.raises(ValueError, match="pixels"):
        write_comparison(paths, tmp_path / "metrics.json", tmp_path / "chart.png")


def test_the_few_shot_benchmarks_headline_numbers_join_the_summary(tmp_path):
    paths = {"ddpm": tmp_path / "ddpm.json", "random": tmp_path / "random.json"}
    for path in paths.values():
        path.write_text(json.dumps({"miou": 0.5, "per_class_iou": {"eye": 0.5}}))
    fewshot = tmp_path / "fewshot.json"
    fewshot.write_text(json.dumps({"metrics": {"fewshot_miou_1shot": 0.3, "fewshot_margin_over_prototype": 6.0},
                                   "methods": {}}))
    summary = write_comparison(paths, tmp_path / "metrics.json", tmp_path / "chart.png", fewshot=fewshot)
    assert summary["fewshot_miou_1shot"] == 0.3 and summary["fewshot_margin_over_prototype"] == 6.0
    fewshot.write_text("{}")
    with pytest.raises(ValueError, match="few-shot metrics"):
        write_comparison(paths, tmp_path / "metrics.json", tmp_path / "chart.png", fewshot=fewshot)
