import json

import pytest

from pipeline.comparison import compare_feature_sources, write_comparison


def test_margins_are_in_points():
    summary = compare_feature_sources({"ddpm": 0.42, "random": 0.30, "pixels": 0.12})
    assert summary == {
        "miou": 0.42, "miou_random_weights": 0.30, "miou_pixels": 0.12,
        "margin_over_random_weights": 12.0, "margin_over_pixels": 30.0,
    }
    with pytest.raises(ValueError, match="unknown"):
        compare_feature_sources({"dino": 0.5})


def test_write_comparison_reads_metrics_files(tmp_path):
    paths = {}
    for source, miou in (("ddpm", 0.5), ("random", 0.25), ("pixels", 0.125)):
        paths[source] = tmp_path / f"{source}.json"
        paths[source].write_text(json.dumps({"miou": miou}))
    summary = write_comparison(paths, tmp_path / "metrics.json", tmp_path / "chart.png")
    assert json.loads((tmp_path / "metrics.json").read_text()) == summary
    assert summary["margin_over_pixels"] == 37.5 and (tmp_path / "chart.png").stat().st_size > 1000
    paths["pixels"].write_text("{}")
    with pytest.raises(ValueError, match="pixels"):
        write_comparison(paths, tmp_path / "metrics.json", tmp_path / "chart.png")
