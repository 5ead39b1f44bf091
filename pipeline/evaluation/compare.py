"""Putting the DDPM features' result beside the baselines' results."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.pictures.figures import save_per_class_iou_chart

# Feature source → (metric name in the comparison, label in the chart).
FEATURE_SOURCES = {
    "ddpm": ("miou", "DDPM features, selected taps"),
    "ddpm_refined": ("miou_refined", "DDPM features, selected taps, refined"),
    "ddpm_paper_taps": ("miou_paper_taps", "DDPM features, the paper's taps"),
    "random": ("miou_random_weights", "same UNet, random weights"),
    "pixels": ("miou_pixels", "raw pixels (neighbourhood)"),
    "synthetic": ("miou_synthetic", "segmenter trained on DDPM samples"),
}


def compare_feature_sources(miou_by_source: dict[str, float]) -> dict:
    """The demo's headline metrics: each source's mIoU and the DDPM features' margins (points).

    Args:
        miou_by_source: "ddpm", "ddpm_refined", "ddpm_paper_taps", "random", "pixels", "synthetic" → mIoU in [0, 1].
    """
    unknown = sorted(set(miou_by_source) - set(FEATURE_SOURCES))
    if unknown:
        raise ValueError(f"unknown feature sources {unknown}; known: {sorted(FEATURE_SOURCES)}")
    summary = {FEATURE_SOURCES[source][0]: miou for source, miou in miou_by_source.items()}
    ddpm = miou_by_source.get("ddpm")
    if ddpm is not None and miou_by_source.get("ddpm_refined") is not None:
        summary["refinement_gain"] = round(100 * (miou_by_source["ddpm_refined"] - ddpm), 2)
    for source in ("ddpm_paper_taps", "random", "pixels"):
        if ddpm is not None and miou_by_source.get(source) is not None:
            summary[f"margin_over_{FEATURE_SOURCES[source][0].removeprefix('miou_')}"] = round(
                100 * (ddpm - miou_by_source[source]), 2
            )
    return summary


def per_class_by_source(per_class_by_source_name: dict[str, dict[str, float | None]]) -> dict[str, dict[str, float | None]]:
    """Class → {source → IoU}: the sources' per-class IoU side by side, in the first source's class order."""
    classes = list(next(iter(per_class_by_source_name.values()), {}))
    return {name: {source: per_class.get(name) for source, per_class in per_class_by_source_name.items()} for name in classes}


def write_comparison(metrics_paths: dict[str, Path], out_json: Path, out_chart: Path, out_per_class: Path | None = None,
                     synthetic_speed: Path | None = None, fewshot: Path | None = None) -> dict:
    """Reads each source's `metrics.json`; writes the headline JSON, a bar chart of the sources'
    mIoU and, when `out_per_class` is given, every class's IoU by source. `synthetic_speed`: the
    JSON of `pipeline.synthetic.speed.measure_speedup`, whose `synthetic_speedup` joins the summary;
    `fewshot`: the few-shot benchmark's metrics.json, whose "metrics" (fewshot_*) join it."""
    miou_by_source, per_class = {}, {}
    for source, path in metrics_paths.items():
        try:
            metrics = json.loads(Path(path).read_text())
            miou_by_source[source], per_class[source] = metrics["miou"], metrics["per_class_iou"]
        except (OSError, ValueError, KeyError) as error:
            raise ValueError(f"cannot read the mIoU of {source!r} from {path}: {error}") from None
    summary = compare_feature_sources(miou_by_source)
    if synthetic_speed is not None:
        try:
            summary["synthetic_speedup"] = json.loads(Path(synthetic_speed).read_text())["synthetic_speedup"]
        except (OSError, ValueError, KeyError) as error:
            raise ValueError(f"cannot read the synthetic_speedup from {synthetic_speed}: {error}") from None
    if fewshot is not None:
        try:
            summary |= json.loads(Path(fewshot).read_text())["metrics"]
        except (OSError, ValueError, KeyError) as error:
            raise ValueError(f"cannot read the few-shot metrics from {fewshot}: {error}") from None
    known = [iou for iou in per_class.get("ddpm", {}).values() if iou is not None]
    if known:  # the class the DDPM features segment worst: a mean can hide a lost small part
        summary["lowest_class_iou"] = min(known)
    Path(out_json).write_text(json.dumps(summary, indent=1))
    if out_per_class is not None:
        Path(out_per_class).write_text(json.dumps(per_class_by_source(per_class), indent=1))
    chart = {FEATURE_SOURCES[source][1]: miou for source, miou in miou_by_source.items()}
    # No mean line: a mean of the three sources' mIoU means nothing.
    save_per_class_iou_chart(out_chart, chart, "demo test mIoU by features and method (same labels)", mean_line=False)
    return summary
