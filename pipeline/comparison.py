"""Putting the DDPM features' result beside the baselines' results."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.visualize import save_per_class_iou_chart

# Feature source → (metric name in the comparison, label in the chart).
FEATURE_SOURCES = {
    "ddpm": ("miou", "DDPM features"),
    "random": ("miou_random_weights", "same UNet, random weights"),
    "pixels": ("miou_pixels", "raw pixels (neighbourhood)"),
}


def compare_feature_sources(miou_by_source: dict[str, float]) -> dict:
    """The demo's headline metrics: each source's mIoU and the DDPM features' margins (points).

    Args:
        miou_by_source: "ddpm", "random", "pixels" → mIoU in [0, 1].
    """
    unknown = sorted(set(miou_by_source) - set(FEATURE_SOURCES))
    if unknown:
        raise ValueError(f"unknown feature sources {unknown}; known: {sorted(FEATURE_SOURCES)}")
    summary = {FEATURE_SOURCES[source][0]: miou for source, miou in miou_by_source.items()}
    ddpm = miou_by_source.get("ddpm")
    for source in ("random", "pixels"):
        if ddpm is not None and miou_by_source.get(source) is not None:
            summary[f"margin_over_{FEATURE_SOURCES[source][0].removeprefix('miou_')}"] = round(
                100 * (ddpm - miou_by_source[source]), 2
            )
    return summary


def write_comparison(metrics_paths: dict[str, Path], out_json: Path, out_chart: Path) -> dict:
    """Reads each source's `metrics.json`, writes the comparison JSON and a bar chart."""
    miou_by_source = {}
    for source, path in metrics_paths.items():
        try:
            miou_by_source[source] = json.loads(Path(path).read_text())["miou"]
        except (OSError, ValueError, KeyError) as error:
            raise ValueError(f"cannot read the mIoU of {source!r} from {path}: {error}") from None
    summary = compare_feature_sources(miou_by_source)
    Path(out_json).write_text(json.dumps(summary, indent=1))
    chart = {FEATURE_SOURCES[source][1]: miou for source, miou in miou_by_source.items()}
    save_per_class_iou_chart(out_chart, chart, "demo test mIoU by features (same ensemble, same labels)")
    return summary
