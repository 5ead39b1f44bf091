"""Extraction at GPU rates without a GPU: can the store writer keep up with the UNet?

A feature source that hands out precomputed paper-shape activations (256², blocks 5, 6, 7, 8,
12 at steps 50/150/250: 50.3 MB of float16 per image, already float16 as a GPU would make them
on the device) goes through the real extraction path: image loading, batching, chunk encoding,
writes, checksums and done marks. Measured in one run, on this machine's disk:

- the disk: a file of the same size written with direct I/O (`dd oflag=direct`), and through
  the page cache then synced (`dd conv=fsync`, the ceiling of any buffered writer);
- the writer: extraction with a source that takes no time, per codec (native layout), and the
  same without the overlap of compute and writes (one batch after the other, as before);
- the writer's steady rate: the same extraction of its first batch alone, subtracted (MB and
  seconds), which leaves out what every extraction pays once whatever its length (creating the
  store, checking the images, loading the first batch: 0.3–0.5 s, 10–20 % of a 32-image run);
- extraction with a simulated model of 0.1 s per image (the paper's ADM on a GPU does the three
  forwards of a 256² image in about that), against the slower of the model and the writer;
- the writer's CPU seconds per image by part, each part alone in this thread: compression and
  CRC32C per codec, the aligned copy and direct write of the chunk files, the whole
  `write_image`, and, for comparison, what the writer before store format 5 also spent: a
  sha256 over the values, and the kernel's copy of every byte into new page-cache pages.

Every timing ends with `os.sync()`: the data is on the disk, not in the page cache. Each measure
is the median of 3 interleaved repeats (a shared VM's disk varies by 2× within minutes), and the
writer's CPU seconds per image say how many cores it needs to keep up with the disk.

    python -m bench --only extraction_gpu_rate [--quick] [--out DIR]
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import (
    PAPER_SIZE,
    PAPER_STEPS,
    PAPER_TAP_SHAPES,
    TINY_SIZE,
    TINY_STEPS,
    TINY_TAP_SHAPES,
    command_line,
    peak_rss_bytes,
    write_result,
)
from pipeline.config import ExtractSettings
from pipeline.extraction.compute import describe_source, extract_batch
from pipeline.extraction.extract import extract_with_runner
from pipeline.extraction.runners import InProcessBatches
from pipeline.sources.base import TapShape
from pipeline.store.chunks import AlignedBuffers, ChunkEncoder, image_chunks, write_chunk_file
from pipeline.store.schema import StoreSchema, regions_sha256, tap_array
from pipeline.store.writer import open_store_for_writing

MODEL_SECONDS_PER_IMAGE = 0.1
# The default codec first: the headline figures and the simulated-model run use it.
CODECS = (ExtractSettings.codec, *(codec for codec in ("blosc-lz4", "zstd", "none") if codec != ExtractSettings.codec))
# The goal's yardstick: a disk of 1 GB/s. On a faster disk the writer's own rate is what it would
# sustain on that one (the disk is not what limits it).
REFERENCE_DISK_MEGABYTES_PER_SECOND = 1000.0


class PrecomputedSource:
    """A `FeatureSource` whose feature maps are fixed random float16 activations, handed out
    after `seconds_per_image` × batch of simulated model time (a sleep, which like a GPU's work
    leaves the CPU to the writer)."""

    def __init__(self, tap_shapes: list[TapShape], steps: list[int], seconds_per_image: float):
        self.steps, self.device, self.seconds_per_image = list(steps), torch.device("cpu"), seconds_per_image
        self.size_multiple = 1
        self._shapes = tap_shapes
        generator = torch.Generator().manual_seed(0)
        self._maps = {shape.name: torch.randn(1, len(steps), shape.channels, shape.height, shape.width,
                                              generator=generator).to(torch.float16) for shape in tap_shapes}

    def provenance(self) -> dict:
        return {"kind": "precomputed", "seconds_per_image": self.seconds_per_image}

    def tap_shapes(self, size) -> list[TapShape]:
        return list(self._shapes)

    def feature_maps(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.seconds_per_image:
            time.sleep(self.seconds_per_image * len(images))
        return {name: maps.expand(len(images), *maps.shape[1:]) for name, maps in self._maps.items()}  # (B, T, C, h, w)


class SequentialBatches(InProcessBatches):
    """The writer before the overlap: each batch computed, then written, then the next."""

    def run(self, writer, records, batches, classes):
        for batch in batches:
            with writer.claim(batch) as claimed:
                written = extract_batch(self.source, writer, {index: records[index] for index in claimed}, claimed,
                                        writer.schema.image_shape, classes)
            yield len(batch), written


def generated_images(folder: Path, count: int, size: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{index:03d}.png")
    return folder


def disk_megabytes_per_second(path: Path, megabytes: int, direct: bool = True) -> float:
    """Sequential write bandwidth of the disk under `path`: `dd` with direct I/O (the raw disk),
    or through the page cache and synced (what any buffered writer, zarr's included, can get)."""
    blocks = max(1, megabytes // 4)
    started = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=4M", f"count={blocks}",
                    "oflag=direct" if direct else "conv=fsync"], check=True, capture_output=True)
    os.sync()
    seconds = time.perf_counter() - started
    path.unlink()
    return blocks * 4 * 1.048576 / seconds


def extraction_rate(images: Path, store: Path, source: PrecomputedSource, size: int, codec: str, batch_size: int,
                    runner: type[InProcessBatches] = InProcessBatches) -> dict:
    """Images/s and MB/s (float16 features, before compression) of one extraction, ending in a
    sync, and the CPU seconds per image it took (all threads of this process)."""
    shutil.rmtree(store, ignore_errors=True)
    os.sync()
    started, cpu_started = time.perf_counter(), time.process_time()
    summary = extract_with_runner(lambda: contextlib.nullcontext(runner(source)), images, store, size,
                                  codec=codec, batch_size=batch_size, show_progress=False)
    os.sync()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    megabytes = sum(shape.channels * shape.height * shape.width for shape in describe_source(source, size).tap_shapes)
    megabytes *= 2 * len(source.steps) / 1e6 * summary.images_written
    on_disk = sum(path.stat().st_size for path in store.rglob("*") if path.is_file()) / 1e6
    shutil.rmtree(store, ignore_errors=True)
    return {"images_per_second": summary.images_written / seconds, "megabytes_per_second": megabytes / seconds,
            "cpu_seconds_per_image": cpu_seconds / summary.images_written, "compression_ratio": megabytes / on_disk,
            "images": summary.images_written, "seconds": seconds, "megabytes": megabytes, "cpu_seconds": cpu_seconds}


def steady_rate(whole: dict, first_batch: dict) -> dict:
    """MB/s and CPU seconds per image of the images after the first batch: a whole extraction's
    MB, seconds and CPU seconds less those of one of its first batch alone."""
    images = whole["images"] - first_batch["images"]
    return {"megabytes_per_second": (whole["megabytes"] - first_batch["megabytes"]) / (whole["seconds"] - first_batch["seconds"]),
            "cpu_seconds_per_image": (whole["cpu_seconds"] - first_batch["cpu_seconds"]) / images}


def writer_cpu_by_part(size: int, taps: list[TapShape], steps: list[int], scratch: Path, images: int) -> dict:
    """CPU seconds per image of each part of writing one native image, every part alone in this
    thread (medians over `images` images, each into new files as in a real store)."""
    source = PrecomputedSource(taps, steps, 0.0)
    maps = {name: tensor[0] for name, tensor in source.feature_maps(torch.zeros(1)).items()}  # tap → (T, C, h, w)
    schema = StoreSchema(layout="native", image_size=size, steps=list(steps), tap_shapes=list(taps),
                         source=source.provenance(), image_names=[str(index) for index in range(images)],
                         image_sha256=["0" * 64] * images)
    image, labels = np.zeros((size, size, 3), np.uint8), np.zeros((size, size), np.int16)
    writers = {codec: open_store_for_writing(scratch / f"parts-{codec}.zarr", schema, codec) for codec in CODECS}
    regions = {tap_array(name): maps[name].numpy() for name in schema.taps}  # array → (T, C, h, w) float16
    buffers, measured = AlignedBuffers(), {}

    def timed(part: str, work, *arguments) -> None:
        started = time.process_time()
        work(*arguments)
        measured.setdefault(part, []).append(time.process_time() - started)

    def feature_chunks(writer, index: int) -> list[tuple[ChunkEncoder, str, np.ndarray]]:
        encoders = [ChunkEncoder(writer.group[name]) for name in regions]
        return [(encoder, key, chunk) for encoder, (name, region) in zip(encoders, regions.items())
                for key, chunk in image_chunks(encoder.array, index, region)]

    def write_files(writer, index: int, direct: bool) -> None:
        """The features' chunk files, in a tree of their own (new folders, as in a store)."""
        for encoder, key, chunk in feature_chunks(writer, index):
            payload, trailer = encoder.encode(chunk)
            if direct:
                write_chunk_file(scratch / "direct" / key, payload, trailer, buffers)
            else:  # as zarr's path did: new files through the page cache (here without the trailer's copy)
                path = scratch / "page-cache" / key
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "wb") as file:
                    file.write(memoryview(payload))

    def encode(chunks) -> None:
        for encoder, _, chunk in chunks:
            encoder.encode(chunk)

    for index in range(images):
        for codec, writer in writers.items():
            timed(f"encode features: {codec}, CRC32C", encode, feature_chunks(writer, index))
        timed("write features: encode (none), folders, aligned copy, direct write, rename", write_files, writers["none"], index, True)
        for codec, writer in writers.items():
            timed(f"whole write_image: {codec}", writer.write_image, index, image, labels, maps)
        timed("before format 5: sha256 of the values", regions_sha256, list(regions.values()))
        timed("before format 5: encode (none), folders, page-cache write into new files", write_files, writers["none"], index, False)
    for path in [scratch / "direct", scratch / "page-cache", *(writer.path for writer in writers.values())]:
        shutil.rmtree(path, ignore_errors=True)
    return {part: round(float(np.median(values[1:] or values)), 4) for part, values in measured.items()}


def _median_of(runs: list[dict]) -> dict:
    """Each measure's median over the repeats, rounded."""
    return {key: round(float(np.median([run[key] for run in runs])), 3) for key in runs[0]}


def run(quick: bool, scratch: Path) -> dict:
    torch.set_num_threads(1)
    size, taps, steps = (TINY_SIZE, TINY_TAP_SHAPES, TINY_STEPS) if quick else (PAPER_SIZE, PAPER_TAP_SHAPES, PAPER_STEPS)
    count, batch_size, repeats = (8, 4, 1) if quick else (32, 4, 3)
    images = generated_images(scratch / "gpu-rate-images", count, size)
    first_batch = generated_images(scratch / "gpu-rate-first-batch", batch_size, size)  # the same first images
    store = scratch / "gpu-rate.zarr"
    per_image_megabytes = sum(shape.channels * shape.height * shape.width for shape in taps) * 2 * len(steps) / 1e6
    disk_megabytes = max(8, round(per_image_megabytes * count))
    measured: dict[str, list] = {}
    for _ in range(repeats):  # interleaved, so a disk that slows down meanwhile slows every measure alike
        measured.setdefault("disk", []).append(disk_megabytes_per_second(scratch / "gpu-rate-disk.bin", disk_megabytes))
        measured.setdefault("disk_buffered", []).append(
            disk_megabytes_per_second(scratch / "gpu-rate-disk.bin", disk_megabytes, direct=False))
        for codec in CODECS:
            whole = extraction_rate(images, store, PrecomputedSource(taps, steps, 0.0), size, codec, batch_size)
            alone = extraction_rate(first_batch, store, PrecomputedSource(taps, steps, 0.0), size, codec, batch_size)
            measured.setdefault(codec, []).append(whole)
            measured.setdefault(f"steady {codec}", []).append(steady_rate(whole, alone))
            measured.setdefault(f"first batch {codec}", []).append(alone["seconds"])
        measured.setdefault("sequential", []).append(extraction_rate(
            images, store, PrecomputedSource(taps, steps, 0.0), size, CODECS[0], batch_size, SequentialBatches))
        measured.setdefault("model", []).append(extraction_rate(
            images, store, PrecomputedSource(taps, steps, MODEL_SECONDS_PER_IMAGE), size, CODECS[0], batch_size))
    disk, disk_buffered = (round(float(np.median(measured[key])), 1) for key in ("disk", "disk_buffered"))
    writer = {codec: _median_of(measured[codec]) for codec in CODECS}
    steady = {codec: _median_of(measured[f"steady {codec}"]) for codec in CODECS}
    model = _median_of(measured["model"])
    bound = min(1 / MODEL_SECONDS_PER_IMAGE, writer[CODECS[0]]["images_per_second"])
    result = {
        "what": "store writer at GPU rates: precomputed paper-shape activations through the real extraction path, "
                f"native layout, each timing ending in os.sync(); medians of {repeats} interleaved repeats",
        "shape": f"{size}², {len(taps)} taps × {len(steps)} steps, {per_image_megabytes:.1f} MB float16 per image",
        "images": count, "batch_size": batch_size, "repeats": repeats,
        "disk_megabytes_per_second_direct_io": disk,
        "disk_megabytes_per_second_direct_io_each": [round(value, 1) for value in measured["disk"]],
        "disk_megabytes_per_second_buffered_and_synced": disk_buffered,
        "writer": writer,
        "writer_steady": steady,
        "first_batch_alone_seconds": {codec: round(float(np.median(measured[f"first batch {codec}"])), 3) for codec in CODECS},
        "default_codec": CODECS[0],
        "writer_without_overlap": _median_of(measured["sequential"]),
        "simulated_model_seconds_per_image": MODEL_SECONDS_PER_IMAGE,
        "extraction_with_simulated_model": model,
        "writer_fraction_of_disk": round(writer[CODECS[0]]["megabytes_per_second"] / disk, 3),
        # (on a disk slower than the reference the disk may have held the writer back: an underestimate)
        "writer_fraction_of_a_1_gb_per_s_disk": round(
            min(REFERENCE_DISK_MEGABYTES_PER_SECOND, writer[CODECS[0]]["megabytes_per_second"])
            / REFERENCE_DISK_MEGABYTES_PER_SECOND, 3),
        "writer_fraction_of_buffered_disk": round(writer[CODECS[0]]["megabytes_per_second"] / disk_buffered, 3),
        "extraction_fraction_of_bound": round(model["images_per_second"] / bound, 3),
        # CPU seconds per image × the disk's images per second: the cores the writer needs to keep up with this disk
        "cores_to_keep_up_with_the_disk": round(
            writer[CODECS[0]]["cpu_seconds_per_image"] * disk / per_image_megabytes, 2),
        "writer_fraction_of_disk_by_codec": {
            codec: round(writer[codec]["megabytes_per_second"] / disk, 3) for codec in CODECS},
        "writer_steady_fraction_of_disk_by_codec": {
            codec: round(steady[codec]["megabytes_per_second"] / disk, 3) for codec in CODECS},
        "cores_to_keep_up_with_the_disk_by_codec": {
            codec: round(writer[codec]["cpu_seconds_per_image"] * disk / per_image_megabytes, 2) for codec in CODECS},
        "writer_cpu_seconds_per_image_by_part": writer_cpu_by_part(size, taps, steps, scratch, 3 if quick else 12),
        "cpu_count": os.cpu_count(),
        # every extraction of the run in one process: at most two batches of features on the host
        "peak_rss_gigabytes": round(peak_rss_bytes() / 2**30, 2),
        "batch_megabytes": round(per_image_megabytes * batch_size, 1),
    }
    result["targets"] = {"writer >= 80 % of the disk": result["writer_fraction_of_disk"] >= 0.8,
                         "writer >= 80 % of a 1 GB/s disk": result["writer_fraction_of_a_1_gb_per_s_disk"] >= 0.8,
                         "steady writer >= 80 % of the disk": result["writer_steady_fraction_of_disk_by_codec"][CODECS[0]] >= 0.8,
                         "extraction >= 90 % of the bound": result["extraction_fraction_of_bound"] >= 0.9}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    arguments, scratch = command_line(__doc__)
    print(write_result("extraction_gpu_rate", run(arguments.quick, scratch)))


if __name__ == "__main__":
    main()
