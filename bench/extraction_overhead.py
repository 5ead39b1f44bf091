"""Target 1: the extract stage runs at ≥ 90 % of the bare UNet forward passes' throughput.

For the same images, steps, batch size and device, three things are timed side by side
(repeats interleaved, median taken):

- bare: the UNet forward passes alone on the preloaded, noised images, each stopped after the
  last decoder block the features need (what extraction computes; the full forward pass is
  timed too, for reference);
- native / dense: the whole extract stage (`extract_features`: image hashing and loading, model
  loading, the forwards with hooks, upsampling, float16 conversion, compression, checksums and
  writing) into a fresh store of that layout.

Model: ../shared/fixtures/adm-tiny (the paper's ADM at 1/8 width, 8.7 M parameters) at 256×256
on cat_15 training images; without ../shared, a tiny UNet on generated images.

    python -m bench.extraction_overhead [--quick] [--images 8] [--repeats 3]
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import SHARED, command_line, extraction_timings, write_result
from pipeline.config import ExtractSettings
from pipeline.data.folders import list_images, load_example
from pipeline.extraction.extract import extract_features
from pipeline.runtime.devices import autocast_for, pick_device
from pipeline.sources.adm.blocks import decoder_block
from pipeline.sources.checkpoints import load_backbone
from pipeline.sources.hooks import capture_outputs, run_until_captured
from pipeline.sources.noise import add_noise, paper_scheduler, shared_noise
from pipeline.sources.tiny_unet import make_tiny_unet
from pipeline.store.reader import FeatureStore

ADM_TINY = SHARED / "fixtures" / "adm-tiny" / "adm_tiny.pt"
CAT_TRAIN = SHARED / "datasets" / "ddpm-seg" / "cat_15" / "real" / "train"


def prepare_inputs(scratch: Path, quick: bool, count: int) -> tuple[Path, Path, ExtractSettings]:
    """(checkpoint, image folder, settings) for the measurement."""
    images = scratch / "overhead-images"
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir(parents=True)
    if not quick and ADM_TINY.is_file() and CAT_TRAIN.is_dir():
        for path in sorted(CAT_TRAIN.glob("*.png"))[:count]:
            shutil.copy(path, images / path.name)
        return ADM_TINY, images, ExtractSettings(size=256, batch_size=4, device="auto")
    rng = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / f"{index:03d}.png")
    make_tiny_unet(32).save_pretrained(scratch / "overhead-unet")
    return scratch / "overhead-unet", images, ExtractSettings(size=32, batch_size=4, device="auto", blocks=[2, 3, 5])


def bare_forwards(
    checkpoint: Path, images_dir: Path, settings: ExtractSettings, truncated: bool, float32: bool = False
) -> float:
    """Seconds for the UNet forwards alone over every image and step (inputs prepared beforehand),
    in extraction's precision (float16 autocast on CUDA) or, with `float32`, in full precision."""
    device = pick_device(settings.device)
    unet = load_backbone(checkpoint).unet.to(device).eval()
    images = np.stack([load_example(record, settings.size)[0] for record in list_images(images_dir)])
    batches = [torch.from_numpy(images[start : start + settings.batch_size]).to(device)
               for start in range(0, len(images), settings.batch_size)]
    noise, scheduler = shared_noise(settings.seed, (1, 3, settings.size, settings.size)), paper_scheduler()
    last = {"last": decoder_block(unet, max(settings.blocks))}
    started = time.perf_counter()
    with torch.inference_mode(), capture_outputs(last if truncated else {}, stop_when_all_captured=truncated) as outputs:
        for batch in batches:
            for step in settings.steps:
                timesteps = torch.full((len(batch),), step, dtype=torch.long, device=device)
                outputs.clear()
                with contextlib.nullcontext() if float32 else autocast_for(device):
                    run_until_captured(unet, add_noise(batch, step, noise, scheduler), timesteps)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def extract_seconds(
    checkpoint: Path, images_dir: Path, store: Path, settings: ExtractSettings, synced: bool = False
) -> float:
    """Seconds of one extraction into a fresh store; `synced`: until its data is on the disk."""
    shutil.rmtree(store, ignore_errors=True)
    if synced:
        os.sync()
    started = time.perf_counter()
    extract_features(checkpoint, images_dir, store, settings, show_progress=False)
    if synced:
        os.sync()
    seconds = time.perf_counter() - started
    assert FeatureStore(store).done_mask().all()
    return seconds


def run(quick: bool, scratch: Path, count: int = 8, repeats: int = 3) -> dict:
    import dataclasses

    torch.set_num_threads(1)
    count, repeats = (8, 1) if quick else (count, repeats)
    checkpoint, images, settings = prepare_inputs(scratch, quick, count)
    times = {"bare_truncated": [], "bare_full": [], "native": [], "dense": []}
    sizes = {}
    for _ in range(repeats):  # interleaved, so slow phases of the machine hit every variant
        times["bare_truncated"].append(bare_forwards(checkpoint, images, settings, truncated=True))
        times["bare_full"].append(bare_forwards(checkpoint, images, settings, truncated=False))
        for layout in ("native", "dense"):
            store = scratch / f"overhead-{layout}.zarr"
            times[layout].append(extract_seconds(checkpoint, images, store, dataclasses.replace(settings, layout=layout)))
            sizes[layout] = FeatureStore(store).disk_bytes() / count
            shutil.rmtree(store)
        print({name: round(values[-1], 2) for name, values in times.items()}, flush=True)
    throughput = {name: count / statistics.median(values) for name, values in times.items()}
    native_ratio = throughput["native"] / throughput["bare_truncated"]
    return {
        "what": "extract-stage images/s vs bare UNet forwards' images/s, same images, steps, batch and device",
        "model": str(checkpoint.name),
        **extraction_timings(settings, str(pick_device(settings.device)), count, repeats, times),
        "store_bytes_per_image": sizes,
        "ratios": {
            "native_vs_bare": round(native_ratio, 3),
            "dense_vs_bare": round(throughput["dense"] / throughput["bare_truncated"], 3),
            "native_vs_bare_full_forward": round(throughput["native"] / throughput["bare_full"], 3),
        },
        "targets": {"native extract >= 90 % of bare forwards": native_ratio >= 0.9},
    }


def main() -> None:
    def options(parser):
        parser.add_argument("--images", type=int, default=8)
        parser.add_argument("--repeats", type=int, default=3)

    arguments, scratch = command_line(__doc__, add_options=options)
    print(write_result("extraction_overhead", run(arguments.quick, scratch, arguments.images, arguments.repeats)))


if __name__ == "__main__":
    main()
