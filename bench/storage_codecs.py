"""Target 5: bytes per image for both layouts and every codec; the default chosen by measurement.

Real activations (computed once per source, then written with each codec and layout, so the
write and read times are the codec's alone):

- demo: the committed demo DDPM (a trained model) on the demo's 16 training scenes, 32×32,
  params.yaml's steps and blocks (864 features per pixel);
- adm-tiny: ../shared/fixtures/adm-tiny (the paper's architecture at 1/8 width, random
  weights) on 4 cat_15 images at 256×256 (1056 features per pixel).

The paper-size figures (552 M-parameter ADM, 8448 features) are in store_size.json
(`python -m bench.store_size`); raw sizes there are exact, compression indicative.

    python -m bench.storage_codecs [--quick]
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import PROJECT_ROOT, SHARED, command_line, directory_bytes, write_result
from pipeline.config import ExtractSettings, load_params
from pipeline.data.folders import list_images, load_example
from pipeline.sources.checkpoints import load_backbone
from pipeline.sources.diffusion_unet import UNetSource
from pipeline.sources.tiny_unet import make_tiny_unet
from pipeline.store.reader import FeatureStore
from pipeline.store.schema import StoreSchema, tap_array
from pipeline.store.writer import open_store_for_writing

CODECS = ["none", "blosc-lz4", "zstd"]
ADM_TINY = SHARED / "fixtures" / "adm-tiny" / "adm_tiny.pt"
CAT_TRAIN = SHARED / "datasets" / "ddpm-seg" / "cat_15" / "real" / "train"
DEMO_CHECKPOINT = PROJECT_ROOT / "data" / "checkpoints" / "demo_ddpm"


def activations_of(checkpoint: Path, images_dir: Path, settings: ExtractSettings, count: int):
    """(schema template, per image its activations) for the first `count` images."""
    source = UNetSource(load_backbone(checkpoint), settings.blocks, settings.steps, settings.seed, torch.device("cpu"))
    records = list_images(images_dir)[:count]
    images = np.stack([load_example(record, settings.size)[0] for record in records])  # (N, 3, S, S)
    maps = source.feature_maps(torch.from_numpy(images))  # tap → (N, T, C, h, w)
    per_image = [{tap: tap_maps[index] for tap, tap_maps in maps.items()} for index in range(len(records))]
    schema = StoreSchema(
        layout="native", image_size=settings.size, steps=list(settings.steps),
        tap_shapes=source.tap_shapes(settings.size), source=source.provenance(),
        image_names=[record.name for record in records], image_sha256=["0" * 64] * len(records),
    )
    return schema, per_image


def measure_codecs(schema: StoreSchema, per_image: list, scratch: Path, repeats: int) -> dict:
    rows = {}
    size = schema.image_size
    blank = np.zeros((size, size, 3), dtype=np.uint8)
    for layout in ("native", "dense"):
        layout_schema = dataclasses.replace(schema, layout=layout)
        names = ["pixels"] if layout == "dense" else [tap_array(tap) for tap in schema.taps]
        for codec in CODECS:
            write_times, read_times = [], []
            for _ in range(repeats):
                path = scratch / f"codec-{layout}-{codec}.zarr"
                shutil.rmtree(path, ignore_errors=True)
                writer = open_store_for_writing(path, layout_schema, codec)
                started = time.perf_counter()
                for index, activations in enumerate(per_image):
                    writer.write_image(index, blank, None, activations)
                write_times.append((time.perf_counter() - started) / len(per_image))
                store = FeatureStore(path, cache_megabytes=0)
                started = time.perf_counter()
                for index in range(len(per_image)):
                    for name in names:
                        store.group[name][index]
                read_times.append((time.perf_counter() - started) / len(per_image))
            raw = sum(store.group[name].nbytes for name in names) / len(per_image)
            stored = sum(directory_bytes(path / name) for name in names) / len(per_image)
            rows[f"{layout}/{codec}"] = {
                "raw_fp16_bytes_per_image": raw,
                "stored_bytes_per_image": stored,
                "ratio_vs_raw_fp16": round(raw / stored, 4),
                "write_seconds_per_image": round(statistics.median(write_times), 4),
                "read_seconds_per_image": round(statistics.median(read_times), 4),
            }
            shutil.rmtree(path)
    return rows


# The default codec (params.yaml extract.codec), chosen from this benchmark's numbers.
DECISION = {
    "default": "none",
    "reasoning": (
        "native stores (the default layout) barely compress: blosc-lz4 1.01-1.02x, zstd 1.09x, and 1.01x "
        "for blosc-lz4 on the real 552 M-parameter ADM (store_size.json); zstd writes no faster and reads "
        "~25 % slower per image (adm-tiny 256²: 26 vs 21 ms), and reading tables is about half of the "
        "training pixel stream's time once the store outgrows the table cache, so zstd's 7-8 % of disk "
        "does not pay for itself; at GPU rates blosc-lz4 costs the writer 1.5x the CPU per image for no "
        "speed (two images in flight, three quiet runs: 0.047-0.051 against 0.071-0.076 CPU-s per image, "
        "837/923/991 against 872/837/775 MB/s, extraction_gpu_rate.json), for 0-2 % more disk. none is "
        "the default; zstd is the choice for archiving a dense store (1.13-1.17x)."
    ),
}


def run(quick: bool, scratch: Path) -> dict:
    torch.set_num_threads(1)
    sources = {}
    if quick:
        images = scratch / "codec-images"
        images.mkdir(parents=True, exist_ok=True)
        from PIL import Image

        for index in range(2):
            Image.fromarray(np.random.default_rng(index).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / f"{index}.png")
        make_tiny_unet(32).save_pretrained(scratch / "codec-unet")
        sources["tiny random UNet, 32x32"] = (scratch / "codec-unet", images, ExtractSettings(size=32, blocks=[2, 3, 5]), 2)
    else:
        from pipeline.data.demo import write_demo_dataset

        params = load_params(PROJECT_ROOT / "params.yaml")
        write_demo_dataset(dataclasses.replace(params.demo, pool_images=0), scratch / "codec-demo")
        sources["demo DDPM (trained), 32x32"] = (DEMO_CHECKPOINT, scratch / "codec-demo" / "real" / "train", params.extract, 16)
        if ADM_TINY.is_file() and CAT_TRAIN.is_dir():
            sources["adm-tiny (random weights), cat_15 at 256x256"] = (ADM_TINY, CAT_TRAIN, ExtractSettings(size=256), 4)
    results = {}
    for name, (checkpoint, images, settings, count) in sources.items():
        schema, per_image = activations_of(checkpoint, images, settings, count)
        results[name] = {"feature_dim": schema.feature_dim, "images": count,
                         "codecs": measure_codecs(schema, per_image, scratch, 1 if quick else 3)}
        print(name, results[name], flush=True)
    return {
        "what": "feature bytes per image on disk, compression ratio vs raw float16, write/read seconds per image",
        "codecs": CODECS,
        "sources": results,
        "decision": DECISION,
        "paper_size_raw_fp16_bytes_per_image": {"native": 3 * (1024 * 32**2 + 2 * 512 * 32**2 + 512 * 64**2 + 256 * 128**2) * 2,
                                                "dense": 256 * 256 * 8448 * 2},
    }


def main() -> None:
    arguments, scratch = command_line(__doc__)
    print(write_result("storage_codecs", run(arguments.quick, scratch)))


if __name__ == "__main__":
    main()
