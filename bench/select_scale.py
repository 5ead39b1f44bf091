"""Issue 29.1: `select` on a superset of the paper's ADM-256 geometry, in bounded memory.

1. Scale: a native store of every decoder block (0–17) of the paper's 256×256 ADM at steps 25,
   50, 150, 250, 500 (10,752 channels per step, 53,760 features per pixel, 0.93 GB per image
   in float16) for 20 labeled 256² images of 34 classes. The tap shapes come from the
   architecture itself (a forward on torch's meta device: shapes without computing); the values
   are random (select's cost needs no information; codec none, as random values do not
   compress). A fresh process runs `select` with the default settings (both cores) and reports
   its seconds and peak RSS; `select_cost`'s forecast, said before it starts, beside them.
2. Extraction of such a superset: the paper's architecture with random weights (diffusers
   format) extracts 2 images (../shared ffhq_34 test images when present) at every decoder block
   and the 5 steps, batch 1, on this machine's device: seconds and stored gigabytes per image.
3. Fidelity, on the demo's superset (data/stores/ddpm-train.zarr, from `dvc repro`; skipped when
   absent): where the exact probe fits, `select` uses it, so its selection is unchanged. The
   reduced probe is forced there too, at several widths and pixel-sample seeds: its choice is
   scored by the exact probe on the same pixels, against the exact probe's own choice.

    python -m bench.select_scale [--quick]
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from bench.common import (
    PAPER_LAYOUT,
    PAPER_SIZE,
    PROJECT_ROOT,
    TINY_SIZE,
    TINY_STEPS,
    TINY_TAP_SHAPES,
    child_benchmark_main,
    environment,
    peak_rss_bytes,
    run_child,
    write_synthetic_store,
)
from pipeline.sources.base import TapShape

SCALE_STEPS = [25, 50, 150, 250, 500]
SCALE_IMAGES = 20
DEMO_SUPERSET = PROJECT_ROOT / "data" / "stores" / "ddpm-train.zarr"
FIDELITY_COMPONENTS = [16, 32]
FIDELITY_SEEDS = [0, 1]


def adm_decoder_shapes() -> list[TapShape]:
    """Every decoder block of the paper's ADM-256 and its output shape, from a meta-device forward."""
    import torch
    from diffusers import UNet2DModel

    from pipeline.sources.adm.blocks import decoder_block_names
    from pipeline.sources.adm.convert import adm_unet_config
    from pipeline.sources.hooks import capture_outputs

    with torch.device("meta"):
        unet = UNet2DModel.from_config(adm_unet_config(PAPER_LAYOUT) | {"sample_size": PAPER_SIZE})
    names = decoder_block_names(unet)
    with torch.no_grad(), capture_outputs({name: unet.get_submodule(name) for name in names}) as outputs:
        unet(torch.zeros(1, 3, PAPER_SIZE, PAPER_SIZE, device="meta"), torch.tensor([50], device="meta"))
    return [TapShape(name, *outputs[name].shape[1:]) for name in names]  # (1, C, h, w) each


def child(arguments: dict) -> dict:
    """Runs `select` on one store in this (fresh) process: its forecast, seconds and peak RSS."""
    from pipeline.config import SelectSettings
    from pipeline.heads.selection import select_cost, select_into_folder

    settings = SelectSettings()
    cost = select_cost(arguments["store"], settings)
    started = time.perf_counter()
    selection = select_into_folder(arguments["store"], Path(arguments["out"]), settings, show_progress=False)
    return {"seconds": round(time.perf_counter() - started, 1), "peak_rss_gigabytes": round(peak_rss_bytes() / 1e9, 2),
            "forecast": {"probe": cost["probe"], "probe_features": cost["probe_features"],
                         "gigabytes": round(cost["bytes"] / 1e9, 2), "seconds_before_greedy": round(cost["seconds"])},
            "selection": {"steps": selection.steps, "taps": selection.taps,
                          "validation_miou": selection.validation_miou}}


def measure_scale(quick: bool, scratch: Path) -> dict:
    tap_shapes = TINY_TAP_SHAPES if quick else adm_decoder_shapes()
    steps, size = (TINY_STEPS, TINY_SIZE) if quick else (SCALE_STEPS, PAPER_SIZE)
    images = 4 if quick else SCALE_IMAGES
    store = scratch / "select-scale.zarr"
    started = time.perf_counter()
    write_synthetic_store(store, "native", images, size, tap_shapes, steps, codec="none")
    written = time.perf_counter() - started
    measured = run_child("bench.select_scale", {"store": str(store), "out": str(scratch / "selection")},
                         threads=2)
    features = len(steps) * sum(shape.channels for shape in tap_shapes)
    return {
        "images": images, "image_size": size, "steps": steps, "taps": len(tap_shapes),
        "features_per_pixel": features,
        "store_gigabytes_per_image": round(2 * len(steps) * sum(s.channels * s.height * s.width for s in tap_shapes) / 1e9, 3),
        "store_write_seconds": round(written, 1),
        **measured,
        "targets": {"at most 4 GB peak": measured["peak_rss_gigabytes"] <= 4,
                    "at most 15 minutes": measured["seconds"] <= 900},
    }


def measure_extraction(scratch: Path, images: int = 2) -> dict:
    """Seconds and stored bytes per image of the full superset, random-weights ADM-256."""
    import torch
    from diffusers import UNet2DModel

    from bench.store_size import prepare_images
    from pipeline.config import ExtractSettings
    from pipeline.extraction.extract import extract_features
    from pipeline.sources.adm.convert import adm_unet_config
    from pipeline.store.reader import FeatureStore

    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # the machine's whole CPU, as a user's extraction
    torch.manual_seed(0)
    UNet2DModel.from_config(adm_unet_config(PAPER_LAYOUT) | {"sample_size": PAPER_SIZE}).save_pretrained(scratch / "adm256")
    source = prepare_images(scratch / "images", images)
    settings = ExtractSettings(steps=SCALE_STEPS, blocks=list(range(18)), batch_size=1, device="auto")
    summary = extract_features(scratch / "adm256", scratch / "images", scratch / "superset.zarr", settings,
                               show_progress=False)
    stored = FeatureStore(scratch / "superset.zarr", cache_megabytes=0).disk_bytes()
    torch.set_num_threads(threads)
    return {"images": source, "steps": SCALE_STEPS, "blocks": "0-17", "features_per_pixel": summary.feature_dim,
            "device": summary.device, "torch_threads": os.cpu_count() or 1,
            "seconds_per_image": round(summary.seconds / summary.images_total, 1),
            "stored_gigabytes_per_image": round(stored / images / 1e9, 3)}


def measure_fidelity() -> dict:
    """The reduced probe's choices on the demo's superset, scored by the exact probe."""
    from pipeline.heads.pixel_ensemble.sampling import select_labeled_pixels
    from pipeline.heads.probe_features import exact_features, sample_pixels
    from pipeline.heads.selection import RidgeProbe, select_steps_and_taps
    from pipeline.store.reader import FeatureStore
    from pipeline.store.schema import select_features

    store = FeatureStore(DEMO_SUPERSET, cache_megabytes=0)
    classes = store.class_info()
    pixels = select_labeled_pixels(store, len(classes.names), classes.ignore_label)
    rows = []
    for seed in FIDELITY_SEEDS:
        sample = sample_pixels(pixels.image_index, pixels.y, pixels.x, pixels.label, 5, 500, np.random.default_rng(seed))
        features = exact_features(DEMO_SUPERSET, select_features(store.schema, None, None), sample, False)
        judge = RidgeProbe(features.values, sample.labels, sample.fold, len(classes.names), classes.ignore_label)
        for group, columns in features.group_columns.items():
            judge.add_group(group, columns)
        for probe, components in [("auto", None), *[("reduced", value) for value in FIDELITY_COMPONENTS]]:
            chosen = select_steps_and_taps(DEMO_SUPERSET, classes.names, classes.ignore_label, seed=seed, probe=probe,
                                           components=components or 32, show_progress=False)
            exact_score = judge.score([(step, tap) for step in chosen.steps for tap in chosen.taps])[0]
            rows.append({"seed": seed, "probe": probe, "components": components, "steps": chosen.steps,
                         "taps": len(chosen.taps),
                         "features": select_features(store.schema, chosen.steps, chosen.taps).feature_dim,
                         "exact_probe_miou": round(float(exact_score), 4)})
    for row in rows:
        exact = next(other for other in rows if other["seed"] == row["seed"] and other["probe"] == "auto")
        row["points_below_exact_choice"] = round(100 * (exact["exact_probe_miou"] - row["exact_probe_miou"]), 2)
    return {"store": str(DEMO_SUPERSET.relative_to(PROJECT_ROOT)), "features_per_pixel": store.feature_dim,
            "note": "probe auto uses the exact probe here (it fits); reduced is forced", "rows": rows}


def run(quick: bool, scratch: Path) -> dict:
    result = {"environment": environment(), "scale": measure_scale(quick, scratch)}
    result["extraction"] = {"skipped": "quick mode"} if quick else measure_extraction(scratch)
    result["fidelity"] = measure_fidelity() if DEMO_SUPERSET.is_dir() and not quick else {"skipped": "no demo superset store" if not quick else "quick mode"}
    return result


def main() -> None:
    child_benchmark_main("select_scale", __doc__, run, child)


if __name__ == "__main__":
    main()
