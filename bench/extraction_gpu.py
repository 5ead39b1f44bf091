"""Issue 20.4: extraction on a GPU with the paper's ADM-256: does the whole extraction keep up
with the bare forwards, and what limits it there (the model, the writer or the disk)?

Builds the paper's 256×256 ADM with random weights, in the diffusers form that converted
guided-diffusion checkpoints take (552 M parameters), and for batch sizes 1, 4 and 16 times,
on the same generated images:

- bare: the forwards alone (steps 50/150/250, stopped after block 12) in float16 autocast, as
  extraction runs them on CUDA, and in float32 for reference;
- extraction: `extract_features` into a fresh native store (hooks, float16 on the device, the
  copy to the host, encoding, writes, checksums, done marks), ending in `os.sync()`.

Once per run, beside them: the disk (direct I/O) and the writer alone (precomputed activations
through the real extraction path, as `extraction_gpu_rate`), so the limit is named.

It needs CUDA: without it the full run records why it skipped (a 552 M-parameter model takes
~40 s per image on a CPU). `--quick` runs the same code at a tiny shape on the CPU (the tests).

    python -m bench --only extraction_gpu --out DIR      # a few minutes on one GPU
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import torch
from diffusers import UNet2DModel

from bench.common import PAPER_LAYOUT, PAPER_SIZE, command_line, write_result
from bench.extraction_gpu_rate import PrecomputedSource, disk_megabytes_per_second, extraction_rate, generated_images
from bench.extraction_overhead import bare_forwards, extract_seconds
from pipeline.config import ExtractSettings
from pipeline.runtime.devices import pick_device
from pipeline.sources.adm.convert import adm_unet_config
from pipeline.sources.loading import load_source
from pipeline.sources.tiny_unet import make_tiny_unet

BATCH_SIZES = (1, 4, 16)


def build_model(folder: Path, quick: bool) -> Path:
    """The paper's ADM-256 with random weights (a tiny UNet in quick mode), saved to `folder`."""
    torch.manual_seed(0)
    unet = make_tiny_unet(32) if quick else UNet2DModel.from_config(adm_unet_config(PAPER_LAYOUT) | {"sample_size": 256})
    unet.save_pretrained(folder)
    return folder


def run(quick: bool, scratch: Path, count: int = 48) -> dict:
    device = pick_device("auto")
    if device.type != "cuda" and not quick:
        return {"skipped": f"no CUDA device here ({device}); run it on a machine with a GPU"}
    size, count = (32, 8) if quick else (PAPER_SIZE, count)
    settings = ExtractSettings(size=size, device=str(device), **({"blocks": [2, 3, 5]} if quick else {}))
    checkpoint = build_model(scratch / "gpu-check-model", quick)
    images = generated_images(scratch / "gpu-check-images", count, size)
    store = scratch / "gpu-check.zarr"
    rows = {}
    for batch_size in BATCH_SIZES:
        batched = dataclasses.replace(settings, batch_size=batch_size)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        bare_forwards(checkpoint, images, batched, truncated=True)  # warm-up: kernels chosen, weights loaded
        bare = bare_forwards(checkpoint, images, batched, truncated=True)
        bare_float32 = bare_forwards(checkpoint, images, batched, truncated=True, float32=True)
        extraction = extract_seconds(checkpoint, images, store, batched, synced=True)
        rows[batch_size] = {
            "bare_float16_images_per_second": round(count / bare, 2),
            "bare_float32_images_per_second": round(count / bare_float32, 2),
            "extraction_images_per_second": round(count / extraction, 2),
            "extraction_fraction_of_bare_float16": round(bare / extraction, 3),
            "peak_gpu_gigabytes": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        }
        print(batch_size, rows[batch_size], flush=True)
    taps = load_source(checkpoint, settings).tap_shapes(size)  # the paper's 5 taps at full size
    per_image_megabytes = sum(shape.channels * shape.height * shape.width for shape in taps) * 2 * len(settings.steps) / 1e6
    writer = extraction_rate(images, store, PrecomputedSource(taps, settings.steps, 0.0), size, settings.codec, 4)
    disk = disk_megabytes_per_second(scratch / "gpu-check-disk.bin", max(8, round(per_image_megabytes * count)))
    best = max(rows.values(), key=lambda row: row["extraction_images_per_second"])
    shutil.rmtree(scratch / "gpu-check-model")
    return {
        "what": "the paper's ADM-256 (random weights) on a GPU: bare forwards vs extraction into a native store, "
                "per batch size; the writer alone and the disk beside them",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "images": count, "size": size, "steps": settings.steps, "blocks": settings.blocks,
        "megabytes_per_image": round(per_image_megabytes, 1),
        "batch_sizes": rows,
        "writer_alone": {key: round(value, 3) for key, value in writer.items()},
        "disk_megabytes_per_second_direct_io": round(disk, 1),
        "disk_images_per_second": round(disk / per_image_megabytes, 2),
        "limit": min(
            ("model (bare float16 forwards)", max(row["bare_float16_images_per_second"] for row in rows.values())),
            ("writer", writer["images_per_second"]),
            ("disk", disk / per_image_megabytes),
            key=lambda pair: pair[1],
        )[0],
        "best_extraction_images_per_second": best["extraction_images_per_second"],
        "cpu_count": os.cpu_count(),
    }


def main() -> None:
    arguments, scratch = command_line(__doc__)
    print(write_result("extraction_gpu", run(arguments.quick, scratch)))


if __name__ == "__main__":
    main()
