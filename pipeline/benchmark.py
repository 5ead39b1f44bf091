"""One benchmark end to end: extract train and test features once, then per seed train the
ensemble and evaluate it, and write a report beside the paper's number.

Output folder layout (`out_dir`):
    images/{train,test}/   links to the protocol's images (the first N of each sorted split)
    stores/{train,test}.zarr   feature stores (resumed when a run is interrupted)
    seed_<k>/ensemble/, seed_<k>/evaluation/   per-seed ensemble, masks, pictures, metrics.json
    seed_<k>/synthetic/, seed_<k>/segmenter/, seed_<k>/segmenter-evaluation/   with DatasetDDPM:
        the samples the seed's ensemble labeled, the segmenter trained on them, its test scores
    report.json, report.md
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import sizes
from pipeline.config import (
    EvaluateSettings,
    ExtractSettings,
    LearningCurveSettings,
    SegmenterSettings,
    SynthesizeSettings,
    TrainSettings,
)
from pipeline.data.folders import (
    ImageRecord,
    check_examples,
    first_images,
    list_images,
    load_class_info,
    require_label_maps,
)
from pipeline.data.presets import Preset, load_preset, preset_for_dataset
from pipeline.evaluation.evaluate import evaluate_on_store
from pipeline.evaluation.learning_curve import CurveSource, learning_curve, write_learning_curve
from pipeline.extraction.extract import extract_features
from pipeline.heads.pixel_ensemble.training import train_on_store
from pipeline.heads.segmenter.training import train_segmenter
from pipeline.store.reader import FeatureStore
from pipeline.synthetic.synthesize import synthesize_dataset

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")


def choose_preset(
    preset: str | None, data_root: str | Path, classes_path: str | Path | None = None, **overrides
) -> tuple[Preset, dict]:
    """The preset to run: a named one (or a preset file), else one made from the dataset's
    `classes.json` (`classes_path`, default `<data_root>/classes.json`); then the given
    overrides (train_images, test_images, image_size, steps, blocks; None: keep).

    Returns:
        (the preset with overrides applied, the overrides that were given).
    """
    if preset is not None:
        chosen = load_preset(preset)
    else:
        path = Path(classes_path) if classes_path else Path(data_root) / "classes.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"no --preset given and no {path}: name a preset or give the dataset's classes.json "
                "(`names`, `ignore_label`, optional `train`/`test` image counts)"
            )
        chosen = preset_for_dataset(load_class_info(path), Path(data_root).resolve().name, json.loads(path.read_text()))
    given = {key: value for key, value in overrides.items() if value is not None}
    return dataclasses.replace(chosen, **given), given


def split_folder(data_root: str | Path, split: str) -> Path:
    """`<root>/real/<split>` (the paper's layout), else `<root>/<split>`.

    Raises:
        FileNotFoundError: naming both places looked at.
    """
    data_root = Path(data_root)
    for candidate in (data_root / "real" / split, data_root / split):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"no {split} split in {data_root}: expected {data_root / 'real' / split} or {data_root / split}")


def protocol_images(data_root: str | Path, split: str, count: int, preset: Preset) -> list[ImageRecord]:
    """The first `count` images of a split (0: all), each checked: labeled, square, valid labels.

    Raises:
        ValueError: naming the folder or file that breaks the protocol.
    """
    folder = split_folder(data_root, split)
    records = first_images(list_images(folder), count, folder)
    require_label_maps(records, folder)
    check_examples(records, preset.classes)
    return records


def link_images(records: list[ImageRecord], folder: Path) -> Path:
    """Makes `folder` hold exactly these images and label maps, as symbolic links (copies where
    links are not possible), so that extraction sees the protocol's images and nothing else."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for record in records:
        for source in (record.image_path, record.label_path):
            target = folder / source.name
            try:
                os.symlink(source.resolve(), target)
            except OSError:
                shutil.copy2(source, target)
    return folder


def peak_memory_megabytes() -> float | None:
    """This process's peak resident memory so far (None where the OS does not tell)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)  # bytes on macOS, KiB on Linux


def _percent(value: float | None) -> float | None:
    return None if value is None else round(100.0 * value, 2)


def summarise_seeds(values: list[float | None]) -> dict:
    """Mean and sample standard deviation (ddof=1; None for one run) over seeds, in percent."""
    known = [value for value in values if value is not None]
    mean = float(np.mean(known)) if known else None
    std = float(np.std(known, ddof=1)) if len(known) > 1 else None
    return {"mean": _percent(mean), "std": _percent(std), "per_seed": [_percent(value) for value in values]}


def run_benchmark(
    preset: Preset,
    data_root: str | Path,
    checkpoint: str | Path,
    out_dir: str | Path,
    extract: ExtractSettings,
    train: TrainSettings,
    evaluate: EvaluateSettings,
    seeds: list[int],
    overrides: dict | None = None,
    show_progress: bool = True,
    datasetddpm: tuple[SynthesizeSettings, SegmenterSettings] | None = None,
    curve: LearningCurveSettings | None = None,
) -> dict:
    """Runs one preset end to end and writes `report.json` and `report.md` into `out_dir`.

    The preset sets the classes, the image counts, the model size, steps and blocks; `extract`
    gives the rest of extraction (layout, batch size, device, noise seed); `train` the protocol,
    whose seed is replaced by each of `seeds` in turn. `overrides` (what was changed from the
    preset file) is recorded in the report. `datasetddpm`: per seed, also the paper's DatasetDDPM
    (`datasetddpm_run`), its seed replaced by the run's. `curve`: also the learning curve on the
    same stores (`pipeline.evaluation.learning_curve`), `learning_curve.json` and `.png` in `out_dir`.

    Returns:
        The report (also written as JSON).
    """
    if not seeds:
        raise ValueError("at least one seed is needed")
    out_dir = Path(out_dir)
    started = time.perf_counter()
    extract = dataclasses.replace(extract, steps=list(preset.steps), blocks=list(preset.blocks), size=preset.image_size)
    # 1. The protocol's images, checked up front (before any model is loaded).
    counts = {"train": preset.train_images, "test": preset.test_images}
    records = {split: protocol_images(data_root, split, counts[split], preset) for split in SPLITS}
    # 2. Features of both splits, once; an interrupted run resumes here.
    seconds, stores, extracted = {}, {}, {}
    for split in SPLITS:
        images = link_images(records[split], out_dir / "images" / split)
        stores[split] = out_dir / "stores" / f"{split}.zarr"
        summary = extract_features(
            checkpoint, images, stores[split], extract, preset.classes, replace_mismatched=True, show_progress=show_progress
        )
        seconds[f"extract_{split}"] = round(summary.seconds, 1)
        extracted[split] = summary.images_written  # fewer than all when a run resumed
        extract = dataclasses.replace(extract, device=summary.device)  # the device actually used
    memory = {"after_extraction": peak_memory_megabytes()}
    # 3. Per seed: train on the training store, evaluate on the test store.
    runs = []
    for seed in seeds:
        seed_dir = out_dir / f"seed_{seed}"
        _, training = train_on_store(
            stores["train"], seed_dir / "ensemble", dataclasses.replace(train, seed=seed), preset.classes, show_progress
        )
        evaluation_started = time.perf_counter()
        metrics = evaluate_on_store(seed_dir / "ensemble", stores["test"], seed_dir / "evaluation", evaluate, show_progress)
        runs.append({
            "seed": seed, "metrics": metrics, "training_pixels": training.training_pixels,
            "epochs_per_member": training.epochs_per_member, "train_seconds": round(training.seconds, 1),
            "evaluate_seconds": round(time.perf_counter() - evaluation_started, 1),
        })
        if datasetddpm is not None:
            runs[-1]["datasetddpm"] = datasetddpm_run(
                checkpoint, seed_dir, out_dir / "images" / "train", stores["test"], *datasetddpm, evaluate, seed, show_progress
            )
        logger.info("seed %d: mIoU %s", seed, metrics["miou"])
    curve_rows = None
    if curve is not None:
        curve_started = time.perf_counter()
        learned = learning_curve({preset.name: CurveSource(stores["train"], stores["test"])}, curve, train, show_progress)
        write_learning_curve(learned, out_dir / "learning_curve.json", out_dir / "learning_curve.png")
        curve_rows = learned["sources"][preset.name]["by_budget"]
        seconds["learning_curve"] = round(time.perf_counter() - curve_started, 1)
    memory["total"] = peak_memory_megabytes()
    seconds["train"] = [run["train_seconds"] for run in runs]
    seconds["evaluate"] = [run["evaluate_seconds"] for run in runs]
    seconds["total"] = round(time.perf_counter() - started, 1)
    report = _report(preset, data_root, checkpoint, extract, train, evaluate, records, stores, runs, seconds, memory)
    if datasetddpm is not None:
        report["datasetddpm"] = _datasetddpm_report(preset, runs, *datasetddpm)
    if curve_rows is not None:
        report["learning_curve"] = curve_rows
    report["preset_overrides"] = overrides or {}
    report["images_extracted_in_this_run"] = extracted
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    (out_dir / "report.md").write_text(format_report(report))
    return report


def datasetddpm_run(
    checkpoint: Path, seed_dir: Path, labeled_images: Path, test_store: Path, synthesize: SynthesizeSettings,
    segmenter: SegmenterSettings, evaluate: EvaluateSettings, seed: int, show_progress: bool,
) -> dict:
    """DatasetDDPM for one seed: samples labeled by the seed's ensemble, a segmenter trained on them
    (its best epoch on the real labeled training images), scored on the test store's images."""
    started = time.perf_counter()
    synthesis = synthesize_dataset(checkpoint, seed_dir / "ensemble", seed_dir / "synthetic",
                                   dataclasses.replace(synthesize, seed=seed), show_progress=show_progress)
    synthesized = time.perf_counter()
    training = train_segmenter(seed_dir / "synthetic", seed_dir / "segmenter", dataclasses.replace(segmenter, seed=seed),
                               labeled_images, show_progress)
    metrics = evaluate_on_store(seed_dir / "segmenter", test_store, seed_dir / "segmenter-evaluation", evaluate, show_progress)
    return {"metrics": metrics, "samples": synthesis.samples, "kept": synthesis.kept, "chosen_epoch": training.chosen_epoch,
            "synthesize_seconds": round(synthesized - started, 1), "segmenter_seconds": round(training.seconds, 1)}


def _datasetddpm_report(preset: Preset, runs: list[dict], synthesize: SynthesizeSettings, segmenter: SegmenterSettings) -> dict:
    miou = summarise_seeds([run["datasetddpm"]["metrics"]["miou"] for run in runs])
    class_names = list(runs[0]["datasetddpm"]["metrics"]["per_class_iou"])
    return {
        "miou_percent": miou,
        "paper_miou_percent": {"mean": preset.paper_datasetddpm_miou, "std": preset.paper_datasetddpm_miou_std},
        "per_class_iou_percent": {
            name: summarise_seeds([run["datasetddpm"]["metrics"]["per_class_iou"][name] for run in runs])["mean"]
            for name in class_names
        },
        "synthesize_settings": dataclasses.asdict(synthesize) | {"seed": "per run"},
        "segmenter_settings": dataclasses.asdict(segmenter) | {"seed": "per run"},
        "runs": [{key: value for key, value in run["datasetddpm"].items() if key != "metrics"} | {"seed": run["seed"]}
                 for run in runs],
    }


def _report(preset, data_root, checkpoint, extract, train, evaluate, records, stores, runs, seconds, memory) -> dict:
    """Gathers the report: ours beside the paper's, per class, time, memory and store sizes."""
    test_store = FeatureStore(stores["test"])
    miou = summarise_seeds([run["metrics"]["miou"] for run in runs])
    class_names = list(runs[0]["metrics"]["per_class_iou"])
    return {
        "preset": preset.name,
        "description": preset.description,
        "data": str(data_root),
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": test_store.schema.source.get("checkpoint_sha256"),
        "paper_checkpoint": preset.checkpoint,
        "images": {split: len(records[split]) for split in SPLITS},
        "features": {"image_size": extract.size, "steps": extract.steps, "blocks": extract.blocks, "taps": test_store.schema.taps,
                     "feature_dim": test_store.feature_dim, "layout": extract.layout, "noise_seed": extract.seed,
                     "noise_draws": extract.noise_draws, "prompt": extract.prompt},
        "protocol": train.protocol,
        "train_settings": dataclasses.asdict(train) | {"seed": "per run"},
        "iou_definition": evaluate.iou,
        "seeds": [run["seed"] for run in runs],
        "miou_percent": miou,
        "paper_miou_percent": {"mean": preset.paper_miou, "std": preset.paper_miou_std},
        "difference_to_paper": None if preset.paper_miou is None or miou["mean"] is None
        else round(miou["mean"] - preset.paper_miou, 2),
        "miou_paper_definition_percent": summarise_seeds([run["metrics"]["miou_paper"] for run in runs]),
        "miou_ignore_excluded_percent": summarise_seeds([run["metrics"]["miou_ignore_excluded"] for run in runs]),
        "per_class_iou_percent": {
            name: summarise_seeds([run["metrics"]["per_class_iou"][name] for run in runs])["mean"] for name in class_names
        },
        "pixel_accuracy_percent": summarise_seeds([run["metrics"]["pixel_accuracy"] for run in runs]),
        "mean_uncertainty": [run["metrics"]["mean_uncertainty"] for run in runs],
        "training": [{key: run[key] for key in ("seed", "training_pixels", "epochs_per_member")} for run in runs],
        "seconds": seconds,
        "peak_memory_megabytes": memory,
        "store_megabytes": {split: round(FeatureStore(path).disk_bytes() / 1e6, 1) for split, path in stores.items()},
        "environment": {"device": extract.device, "torch": torch.__version__, "python": platform.python_version(),
                        "machine": platform.machine(), "cpu_threads": torch.get_num_threads()},
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def plus_minus(summary: dict, unit: str = "") -> str | None:
    """A figure over seeds for people: "71.3 ± 0.4" (a spread: two seeds or more), "71.3" (one seed),
    None where there is no figure (no result; no paper number for the dataset). `unit`, e.g. " %",
    is appended."""
    if summary.get("mean") is None:
        return None
    spread = f" ± {summary['std']:.1f}" if summary.get("std") is not None else ""
    return f"{summary['mean']:.1f}{spread}{unit}"


def summary_line(report: dict) -> str:
    """The report in one line for the console: ours, the paper's where it has a number, time, memory."""
    ours = plus_minus(report["miou_percent"], " %") or "n/a"
    line = f"benchmark {report['preset']}: mIoU {ours} over seeds {report['seeds']}"
    paper = plus_minus(report["paper_miou_percent"], " %")
    if paper:
        line += f" (paper: {paper})"
    line += f" in {report['seconds']['total']} s"
    memory = report["peak_memory_megabytes"]["total"]
    if memory is not None:
        line += f", peak memory {memory} MB"
    return line


def format_report(report: dict) -> str:
    """The report as a short Markdown page (the paper's row only where the paper has a number)."""
    paper = plus_minus(report["paper_miou_percent"])
    memory = report["peak_memory_megabytes"]["total"]
    lines = [
        f"# Benchmark {report['preset']}",
        "",
        f"{report['description']}",
        "",
        "| | mIoU (%) |",
        "|---|---|",
        f"| ours ({len(report['seeds'])} seed(s), {report['protocol']} protocol, IoU: {report['iou_definition']}) "
        f"| {plus_minus(report['miou_percent']) or 'n/a'} |",
    ]
    if paper:
        lines.append(f"| paper (checkpoint {report['paper_checkpoint'] or 'n/a'}) | {paper} |")
    if "datasetddpm" in report:
        synthetic = report["datasetddpm"]
        lines.append(f"| DatasetDDPM: {synthetic['segmenter_settings']['architecture']} trained on "
                     f"{synthetic['runs'][0]['kept']} of {synthetic['runs'][0]['samples']} labeled samples "
                     f"| {plus_minus(synthetic['miou_percent']) or 'n/a'} |")
        paper_synthetic = plus_minus(synthetic["paper_miou_percent"])
        if paper_synthetic:
            lines.append(f"| paper's DatasetDDPM | {paper_synthetic} |")
    lines += [
        "",
        f"Checkpoint: `{report['checkpoint']}` (sha256 {report['checkpoint_sha256'][:12]}…); "
        f"images: {report['images']['train']} train, {report['images']['test']} test; "
        f"features: {report['features']['feature_dim']} per pixel at {sizes.describe(report['features']['image_size'])}.",
        f"Training: {report['train_settings']['members']} members, at most {report['train_settings']['max_epochs']} "
        f"epochs, batch {report['train_settings']['batch_size']}; preset overrides: {report['preset_overrides'] or 'none'}.",
        f"Time: {report['seconds']['total']} s in all (extraction {report['seconds']['extract_train']} + "
        f"{report['seconds']['extract_test']} s, training {report['seconds']['train']} s, evaluation "
        f"{report['seconds']['evaluate']} s)."
        + (f" Peak memory: {memory} MB." if memory is not None else "")
        + f" Stores: {report['store_megabytes']['train']} + {report['store_megabytes']['test']} MB.",
        "",
        "| class | IoU (%) |",
        "|---|---|",
    ]
    lines += [f"| {name} | {'n/a' if value is None else f'{value:.1f}'} |" for name, value in report["per_class_iou_percent"].items()]
    return "\n".join(lines) + "\n"
