"""The summary table of bench/results/*.json: every figure beside its reference and target.

    python -m bench.report [--results bench/results]   → bench/results/summary.md
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from bench.common import RESULTS_DIR

GB, MB = 1e9, 1e6


def _load(results: Path, name: str) -> dict | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _holds(flags: dict | None) -> str:
    if not flags:
        return "—"
    return "yes" if all(flags.values()) else "**no**: " + "; ".join(name for name, ok in flags.items() if not ok)


def _extraction(result: dict) -> list[str]:
    ratios, speed = result["ratios"], result["images_per_second"]
    return [
        f"| 1 extraction overhead ({result['model']}, {result['size']}², {result['images']} images, {result['device']}) "
        f"| native {100 * ratios['native_vs_bare']:.0f} % of bare forwards ({speed['native']:.2f} vs {speed['bare_truncated']:.2f} img/s); "
        f"dense {100 * ratios['dense_vs_bare']:.0f} % | bare forwards = 100 % | native ≥ 90 % | {_holds(result['targets'])} |"
    ]


def _gpu_rate(result: dict) -> list[str]:
    default = result.get("default_codec", "blosc-lz4")
    writer, model = result["writer"][default], result["extraction_with_simulated_model"]
    others = "; ".join(
        f"{codec} {row['megabytes_per_second']:.0f} MB/s, {row['cpu_seconds_per_image']:.3f} CPU-s/image"
        for codec, row in result["writer"].items() if codec != default
    )
    reference = result.get("writer_fraction_of_a_1_gb_per_s_disk")
    reference = f", {100 * reference:.0f} % of a 1 GB/s disk" if reference is not None else ""
    steady = "; after the first batch (what every extraction pays once left out) " + ", ".join(
        f"{codec} {row['megabytes_per_second']:.0f} MB/s = {100 * result['writer_steady_fraction_of_disk_by_codec'][codec]:.0f} %"
        for codec, row in result["writer_steady"].items()) if "writer_steady" in result else ""
    return [
        f"| 20 store writer at GPU rates ({result['shape']}) | {writer['megabytes_per_second']:.0f} MB/s "
        f"({writer['images_per_second']:.1f} img/s, {default}, {writer['cpu_seconds_per_image']:.3f} CPU-s/image): "
        f"{100 * result['writer_fraction_of_disk']:.0f} % of this disk{reference} ({others}){steady}; "
        f"with a 0.1 s/image model {model['images_per_second']:.1f} img/s, {100 * result['extraction_fraction_of_bound']:.0f} % "
        f"of the slower of model and writer | disk {result['disk_megabytes_per_second_direct_io']:.0f} MB/s (direct I/O) "
        f"| ≥ 80 % of the disk; ≥ 90 % of the bound | {_holds(result['targets'])} |"
    ]


def _gpu_extraction(result: dict) -> list[str]:
    if "skipped" in result:
        return [f"| 20.4 extraction on a GPU (paper's ADM-256) | skipped: {result['skipped']} | | | |"]
    rows = "; ".join(
        f"batch {batch}: extraction {row['extraction_images_per_second']:.1f} img/s = "
        f"{100 * row['extraction_fraction_of_bare_float16']:.0f} % of bare float16 forwards "
        f"({row['bare_float16_images_per_second']:.1f}; float32 {row['bare_float32_images_per_second']:.1f})"
        for batch, row in result["batch_sizes"].items()
    )
    return [
        f"| 20.4 extraction on a GPU (paper's ADM-256, {result['device']}, {result['cpu_count']} CPUs) | {rows} "
        f"| writer alone {result['writer_alone']['images_per_second']:.1f} img/s, disk {result['disk_images_per_second']:.1f} "
        f"img/s ({result['disk_megabytes_per_second_direct_io']:.0f} MB/s) | limit: {result['limit']} | — |"
    ]


def _latent_extraction(result: dict) -> list[str]:
    ratios, speed, megabytes = result["ratios"], result["images_per_second"], result["store_megabytes_per_image"]
    return [
        f"| 1 extraction overhead, latent diffusion ({result['unet_parameters'] / 1e6:.0f} M-parameter SD-shaped UNet, "
        f"{result['size']}², taps {', '.join(result['blocks'])}, {result['images']} images, {result['device']}) "
        f"| extract {100 * ratios['extract_vs_bare']:.0f} % of bare VAE encode + forwards ({speed['extract']:.2f} vs "
        f"{speed['bare_truncated']:.2f} img/s); {megabytes['features_float16']:.2f} MB/image float16 features "
        f"| bare VAE encode + forwards = 100 % | extract ≥ 90 % | {_holds(result['targets'])} |"
    ]


def _memory(result: dict) -> list[str]:
    rows = result["rows"]
    peaks = ", ".join(f"{row['images']}: {row['peak_rss_bytes'] / GB:.2f}" for row in rows)
    official = ", ".join(f"{row['images']}: {row['official_fp32_bytes'] / GB:.1f}" for row in rows)
    beyond = ", ".join(f"{row['beyond_held_bytes'] / GB:.2f}" for row in rows)
    held = rows[-1]["held_by_choice"]
    held_text = " + ".join(f"{name.replace('_', ' ')} {value / GB:.2f}" for name, value in held.items())
    return [
        f"| 2 training peak RSS, GB by images (8448-d, 256², cache {result['settings']['cache_megabytes']} MB) | {peaks}; "
        f"held by choice at {rows[-1]['images']}: {held_text}; the rest {beyond} "
        f"({100 * result['growth_beyond_held']:+.1f} %; "
        f"{100 * result.get('growth_beyond_held_counting_the_pixel_index_as_growth', float('nan')):+.1f} % counting the pixel list as growth) "
        f"| official fp32 in RAM: {official} | rest flat (< 10 %), ≤ 4 GB at 40 | "
        f"{_holds(result['targets'])} |"
    ]


def _comparisons(result: dict, marker: str) -> list[tuple[str, dict]]:
    """The (name, comparison) entries of a result that hold `marker` (skipped datasets are strings)."""
    return [(name, value) for name, value in result.items() if isinstance(value, dict) and marker in value]


def _speed(result: dict) -> list[str]:
    lines = []
    for name, comparison in _comparisons(result, "speedup"):
        lines.append(
            f"| 3 training speed, {name} | fast {comparison['fast_seconds_median']:.1f} s, mIoU {comparison['fast_miou_mean']:.3f} "
            f"({comparison['speedup']:.1f}× faster, gap {comparison['miou_gap_points']:+.2f} points) "
            f"| paper protocol {comparison['paper_seconds_median']:.1f} s, mIoU {comparison['paper_miou_mean']:.3f} "
            f"| ≥ 10×, within 1 point | {_holds(comparison['targets'])} |"
        )
    return lines


def _fast_classes(result: dict) -> list[str]:
    lines = []
    for name, comparison in _comparisons(result, "summary"):
        fast, paper, floorless = (comparison["summary"][key] for key in ("fast", "paper", "fast, no step floor"))
        (worst, gap), = fast["worst_class_gap_points"].items()
        lines.append(
            f"| 3 fast protocol per class, {name} (validation) | fast {fast['seconds_median']:.1f} s, mIoU {fast['miou_mean']:.3f} "
            f"({fast['speedup_over_paper']:.1f}× faster, gap {fast['miou_gap_points']:+.2f} points, worst class {worst} {gap:+.1f}); "
            f"without the step floor mIoU {floorless['miou_mean']:.3f}, classes at 0: {', '.join(floorless['classes_at_zero']) or 'none'} "
            f"| paper protocol {paper['seconds_median']:.1f} s, mIoU {paper['miou_mean']:.3f} "
            f"| ≥ 5×, within 1 point, no class > 5 points below | {_holds(comparison['targets'])} |"
        )
    return lines


def _sampling(result: dict) -> list[str]:
    consumption, ratios = result["consumption"], result["ratios"]
    return [
        f"| 4 pixel stream, pixels/s ({result['feature_dim']}-d) | native {result['native']['pixels_per_second']:,.0f} "
        f"({ratios['native_vs_fast_protocol']:.1f}× fast-protocol use, {ratios['native_vs_paper_protocol']:.1f}× paper-protocol use); "
        f"dense {result['dense']['pixels_per_second']:,.0f} ({result['dense']['feature_chunk_reads_per_buffer']:.0f} whole-chunk reads per "
        f"{result['dense']['buffer_pixels']:,}-pixel buffer)"
        + _subset_cell(result.get("native_subset"), result["native"])
        + f" | ensemble uses {consumption['fast_protocol_pixels_per_second']:,.0f} (fast), "
        f"{consumption['paper_protocol_pixels_per_second']:,.0f} (paper, per member) | ≥ 5× use | {_holds(result['targets'])} |"
    ]


def _subset_cell(subset: dict | None, native: dict) -> str:
    """The stream of a selection of the store (train --steps/--blocks), when measured."""
    if subset is None:
        return ""
    return (
        f"; one tap at one step ({subset['feature_dim']}-d) of the same native store {subset['pixels_per_second']:,.0f}, "
        f"reading {subset['feature_megabytes_read_per_buffer']:,.0f} MB per buffer instead of "
        f"{native['feature_megabytes_read_per_buffer']:,.0f} MB"
    )


def _storage(result: dict) -> list[str]:
    lines = []
    for source, measured in result["sources"].items():
        cells = "; ".join(
            f"{name} {row['stored_bytes_per_image'] / MB:.2f} MB ({row['ratio_vs_raw_fp16']:.2f}×, write {1000 * row['write_seconds_per_image']:.0f} ms)"
            for name, row in measured["codecs"].items()
        )
        lines.append(f"| 5 storage per image, {source} ({measured['feature_dim']}-d) | {cells} | raw fp16 = 1.00× | default by measurement | — |")
    if "decision" in result:
        lines.append(f"| 5 default codec | {result['decision']['default']}: {result['decision']['reasoning']} | | | |")
    paper = result.get("paper_size_raw_fp16_bytes_per_image")
    if paper:
        lines.append(
            f"| 5 storage per image, paper size (8448-d, 256²) | native {paper['native'] / MB:.1f} MB fp16 | dense {paper['dense'] / MB:,.0f} MB; "
            f"official fp32 in RAM {2 * paper['dense'] / MB:,.0f} MB | — | — |"
        )
    return lines


def _dvc(result: dict) -> list[str]:
    cells = "; ".join(
        f"{name}: +{value['overhead_seconds_fixed']:.1f} s + {value['overhead_seconds_per_image']:.3f} s/image, "
        f"disk {value['disk_vs_store']:.2f}× store"
        for name, value in result["variants"].items()
    )
    chosen = result["chosen"]
    fractions = result["overhead_fraction_of_extraction"][chosen]
    cpu = "n/a" if fractions["cpu"] is None else f"{100 * fractions['cpu']:.2f} %"
    per_image = result["variants"][chosen]["overhead_seconds_per_image"]
    seconds = result["extraction_seconds_per_image"]
    return [
        f"| 6 DVC on a {result['store_bytes'] / GB:.2f} GB native store ({result['images']} images) | {cells} "
        f"| chosen ({chosen}): +{per_image:.3f} s/image = {cpu} of CPU extraction, "
        f"{100 * fractions['gpu_rate']:.1f} % of GPU-rate extraction ({seconds['gpu_rate']:.2f} s/image) "
        f"| no doubled disk, ≤ 10 % | {_holds(result['targets'])} |"
    ]


def _evaluation(result: dict) -> list[str]:
    rows = "; ".join(
        f"{row['test_images']} images: peak {row['peak_rss_bytes'] / GB:.2f} GB, {row['images_per_second']:.2f} img/s" for row in result["rows"]
    )
    paper = result.get("paper_shape")
    paper_text = (
        f"; paper shape (8448-d, 256², 10 members) {paper['seconds_per_image']:.1f} s/image ({paper['pixels_per_second']:,.0f} px/s)"
        if paper else ""
    )
    return [
        f"| 7 evaluation ({result['shape']['feature_dim']}-d, {result['shape']['size']}²) | {rows}{paper_text} "
        f"| official: re-extracts test features every run | peak independent of test-set size | {_holds(result['targets'])} |"
    ]


def _inference(result: dict) -> list[str]:
    lines = []
    for name, comparison in _comparisons(result, "speedup"):
        lines.append(
            f"| 7 inference, {name} | block tables {comparison['seconds_per_image_block_tables']:.2f} s/image "
            f"({comparison['speedup']:.1f}× faster; {comparison['pixels_with_other_labels']} pixels of "
            f"{comparison['images']} images labeled otherwise, disagreement within {comparison['largest_disagreement_difference']:.1e}) "
            f"| upsampled feature vectors {comparison['seconds_per_image_upsampled_features']:.2f} s/image "
            f"| {', '.join(comparison['targets'])} | {_holds(comparison['targets'])} |"
        )
    return lines


def _refine(result: dict) -> list[str]:
    return [
        f"| 19 refinement ({result['shape']}, schedule {result['schedule']}) | {result['seconds_per_image_refine']:.2f} s/image "
        f"({result['refine_vs_ensemble']:.2f}× the ensemble's prediction) | the ensemble's prediction "
        f"{result['seconds_per_image_ensemble']:.2f} s/image | ≤ 1× | {_holds(result['targets'])} |"
    ]


def _pretrain(result: dict) -> list[str]:
    steps, model = result["seconds_per_step"], result["model"]
    native = "native" if result["native_bfloat16"] else "emulated"
    return [
        f"| pretrain step ({model['block_out_channels']}, batch {model['batch_size']}, {model['image_size']}², "
        f"{result['cpu_capability']} CPU, bfloat16 {native}) | bfloat16 {steps['bfloat16']:.2f} s "
        f"({result['bfloat16_speedup']:.2f}× float32) | float32 {steps['float32']:.2f} s | — | — |"
    ]


def _segmenter_speed(result: dict) -> list[str]:
    shape = next(value for key, value in result.items() if key.startswith(("paper shape", "tiny shape")))
    seconds = shape["seconds_per_image"]
    demo = result["demo"]
    demo_text = demo if isinstance(demo, str) else (
        f"demo {demo['images']} faces: {demo['synthetic_speedup']}× "
        f"({demo['seconds_per_image']['features_and_ensemble']:.4f} vs {demo['seconds_per_image']['segmenter']:.4f} s)")
    return [
        f"| 27 distilled segmenter vs extract + ensemble ({shape['size']}², {shape['threads']} thread) "
        f"| {shape['speedup']}× faster ({seconds['features_and_ensemble']:.3f} vs {seconds['segmenter']:.4f} s/image); {demo_text} "
        f"| extract + ensemble = 1× | ≥ 50× at 256² | {_holds({'speedup >= 50': shape['speedup'] >= 50})} |"
    ]


def _select_scale(result: dict) -> list[str]:
    scale = result["scale"]
    fidelity = result["fidelity"]
    at_default = [row["points_below_exact_choice"] for row in fidelity.get("rows", [])
                  if row["probe"] == "reduced" and row["components"] == 32]
    worst = ("" if not at_default else
             f"; on the demo superset the reduced probe's choice (32 components) {min(at_default):.1f}–"
             f"{max(at_default):.1f} points below the exact one's")
    return [
        f"| 29.1 `select` on a {scale['features_per_pixel']:,}-feature superset ({scale['images']} images, "
        f"{scale['image_size']}², {scale['forecast']['probe']} probe) | {scale['seconds'] / 60:.1f} min, peak "
        f"{scale['peak_rss_gigabytes']:.2f} GB{worst} | exact probe: 4.3 GB of pixels + 139 GB of Gram rows "
        f"| ≤ 4 GB, ≤ 15 min | {_holds(scale['targets'])} |"
    ]


def _thread_defaults(result: dict) -> list[str]:
    if "stages" not in result:
        return [f"| 29.3 thread defaults | {result.get('skipped', 'not measured')} | | | |"]
    load = result["busy_processes"]
    rows = result["stages"].values()
    quiet_gain = [row["speedup of 2 threads, quiet"] for row in rows]
    loaded_loss = [row["slowdown of 2 threads, loaded"] for row in rows]
    one_thread_loss = [row[f"threads 1, {load} busy"] / row["threads 1, 0 busy"] for row in rows]
    return [
        f"| 29.3 thread defaults, {result['cpu_count']} cores beside {load} busy process(es), {len(quiet_gain)} stages "
        f"| 1 thread (the default): {min(one_thread_loss):.2f}–{max(one_thread_loss):.2f}× its quiet time "
        f"| torch's default, 2 threads: {min(quiet_gain):.2f}–{max(quiet_gain):.2f}× faster quiet, "
        f"{min(loaded_loss):.2f}–{max(loaded_loss):.2f}× slower than 1 thread loaded "
        f"| no stage slows over 1.5× under load | {_holds({'1 thread <= 1.5x': max(one_thread_loss) <= 1.5})} |"
    ]


SECTIONS: dict[str, Callable[[dict], list[str]]] = {
    "extraction_overhead": _extraction,
    "extraction_gpu_rate": _gpu_rate,
    "extraction_gpu": _gpu_extraction,
    "latent_extraction": _latent_extraction,
    "training_memory": _memory,
    "training_speed": _speed,
    "fast_protocol_classes": _fast_classes,
    "sampling_throughput": _sampling,
    "storage_codecs": _storage,
    "dvc_overhead": _dvc,
    "evaluation_streaming": _evaluation,
    "inference_speed": _inference,
    "refine_speed": _refine,
    "pretrain_speed": _pretrain,
    "segmenter_speed": _segmenter_speed,
    "select_scale": _select_scale,
    "thread_defaults": _thread_defaults,
}


def summary_table(results: Path) -> str:
    lines = ["| target | segcache (measured) | reference | goal | holds |", "|---|---|---|---|---|"]
    for name, section in SECTIONS.items():
        result = _load(results, name)
        if result is None:
            lines.append(f"| {name} | not measured | | | |")
            continue
        try:
            lines.extend(section(result))
        except (KeyError, TypeError, ZeroDivisionError) as error:
            lines.append(f"| {name} | incomplete result ({error!r}) | | | |")
    return "\n".join(lines) + "\n"


def write_summary(results: Path = RESULTS_DIR) -> Path:
    path = results / "summary.md"
    path.write_text(summary_table(results))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    print(write_summary(parser.parse_args().results).read_text())


if __name__ == "__main__":
    main()
