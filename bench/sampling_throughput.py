"""Target 4: streaming labeled pixels is never the bottleneck.

Measures, on synthetic stores at the paper's shapes (8448 features per pixel, every pixel
labeled), how fast `PixelStream` delivers random labeled pixels' full feature vectors with
the default buffer and cache (native layout: 40 images, more than the cache holds; dense
layout: 2 images, 2.2 GB), and how fast the ensemble consumes them: one fused step of the
fast protocol (10 members, each its own 256 pixels) and one member's step of the paper
protocol (batch 64), on random inputs of the same width.

    python -m bench.sampling_throughput [--quick]
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import (
    PAPER_CLASSES,
    PAPER_SIZE,
    PAPER_STEPS,
    PAPER_TAP_SHAPES,
    TINY_SIZE,
    TINY_STEPS,
    TINY_TAP_SHAPES,
    command_line,
    median_seconds,
    write_result,
    write_synthetic_store,
)
from pipeline.config import TrainSettings
from pipeline.heads.pixel_ensemble.ensemble import make_pixel_classifier
from pipeline.heads.pixel_ensemble.members import FusedMembers
from pipeline.heads.pixel_ensemble.sampling import PixelStream, select_labeled_pixels
from pipeline.store.reader import FeatureStore


def stream_rate(
    store_path: Path, num_classes: int, settings: TrainSettings, buffers: int, steps=None, taps=None
) -> dict:
    """Pixels per second between consecutive buffers of an epoch (the consumer waits on nothing
    else), and how many chunk reads (and bytes) each buffer took; `steps`/`taps`: a selection."""
    store = FeatureStore(store_path, settings.cache_megabytes, steps, taps)
    pixels = select_labeled_pixels(store, num_classes, 255, settings.min_class_pixels)
    stream = PixelStream(store, pixels, settings.fast_batch_size, settings.buffer_pixels)
    reads, read_bytes = [], []
    original_read = store.read_region

    def counted_read(*args):
        region = original_read(*args)
        reads.append(args[0])
        read_bytes.append(region.nbytes if args[0] not in ("labels", "done") else 0)
        return region

    store.read_region = counted_read
    intervals, sizes = [], []
    started = time.perf_counter()
    for position, (features, _) in enumerate(stream.buffers(np.random.default_rng(0))):
        now = time.perf_counter()
        intervals.append(now - started)
        sizes.append(len(features))
        started = now
        if position + 1 >= buffers:
            break
    steady = intervals[1:] or intervals  # the first buffer also pays for opening the store
    feature_reads = sum(1 for name in reads if name not in ("labels", "done"))
    return {
        "pixels_per_second": round(statistics.median(sizes) / statistics.median(steady), 1),
        "buffer_pixels": settings.buffer_pixels,
        "buffers_timed": len(intervals),
        "seconds_per_buffer": [round(value, 3) for value in intervals],
        "feature_chunk_reads_per_buffer": round(feature_reads / len(intervals), 1),
        "feature_megabytes_read_per_buffer": round(sum(read_bytes) / len(intervals) / 1e6, 1),
        "feature_dim": store.feature_dim,
        "labeled_pixels": len(pixels),
        "images": store.num_images,
    }


def consumption_rates(feature_dim: int, num_classes: int, settings: TrainSettings, repeats: int) -> dict:
    """Training pixels per second the ensemble takes in, fast and paper protocol."""
    generator = torch.Generator().manual_seed(0)
    members = [make_pixel_classifier(feature_dim, num_classes, generator) for _ in range(settings.members)]
    fused = FusedMembers(members).train()
    optimizer = torch.optim.Adam(fused.parameters(), lr=1e-3, fused=True)
    batch = settings.fast_batch_size
    features = torch.randn(settings.members, batch, feature_dim)
    labels = torch.randint(0, num_classes, (settings.members, batch))

    def fused_step():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(fused(features).reshape(-1, num_classes), labels.reshape(-1))
        loss.backward()
        optimizer.step()

    member = members[0].train()
    member_optimizer = torch.optim.Adam(member.parameters(), lr=1e-3)
    member_features, member_labels = torch.randn(settings.batch_size, feature_dim), labels[0, : settings.batch_size]

    def member_step():
        member_optimizer.zero_grad()
        torch.nn.functional.cross_entropy(member(member_features), member_labels).backward()
        member_optimizer.step()

    fused_step(), member_step()  # warm-up
    fused_seconds, _ = median_seconds(fused_step, repeats)
    member_seconds, _ = median_seconds(member_step, repeats * 4)
    return {
        # The fast protocol reads each buffer once for all members: a step consumes `batch` pixels.
        "fast_protocol_pixels_per_second": round(batch / fused_seconds, 1),
        # The paper protocol streams each member separately: a member's step consumes its batch.
        "paper_protocol_pixels_per_second": round(settings.batch_size / member_seconds, 1),
    }


def run(quick: bool, scratch: Path) -> dict:
    settings = TrainSettings()
    if quick:
        shapes, size, steps, classes, native_images, dense_images, buffers = TINY_TAP_SHAPES, TINY_SIZE, TINY_STEPS, 3, 6, 2, 3
        settings = TrainSettings(buffer_pixels=256, cache_megabytes=0)
    else:
        shapes, size, steps, classes, native_images, dense_images, buffers = (
            PAPER_TAP_SHAPES, PAPER_SIZE, PAPER_STEPS, PAPER_CLASSES, 40, 2, 6
        )
    torch.set_num_threads(1)
    native = write_synthetic_store(scratch / "sampling-native.zarr", "native", native_images, size, shapes, steps, classes)
    native_rate = stream_rate(native, classes, settings, buffers)
    # One tap at one step of the same store (issue 18: train on a subset): only its array is read.
    subset = {"steps": [steps[-1]], "taps": [shapes[-1].name]}
    subset_rate = stream_rate(native, classes, settings, buffers, **subset)
    dense = write_synthetic_store(scratch / "sampling-dense.zarr", "dense", dense_images, size, shapes, steps, classes)
    dense_rate = stream_rate(dense, classes, settings, buffers)
    feature_dim = FeatureStore(native).feature_dim
    consumption = consumption_rates(feature_dim, classes, settings, repeats=3 if quick else 7)
    fast, paper = consumption["fast_protocol_pixels_per_second"], consumption["paper_protocol_pixels_per_second"]
    native_ratio_fast = native_rate["pixels_per_second"] / fast
    return {
        "what": "pixels/s delivered by PixelStream vs pixels/s the ensemble consumes (1 thread each)",
        "feature_dim": feature_dim,
        "settings": {"buffer_pixels": settings.buffer_pixels, "cache_megabytes": settings.cache_megabytes},
        "native": native_rate,
        "native_subset": {"selection": subset, **subset_rate},
        "dense": dense_rate,
        "consumption": consumption,
        "ratios": {
            "native_vs_fast_protocol": round(native_ratio_fast, 2),
            "native_vs_paper_protocol": round(native_rate["pixels_per_second"] / paper, 2),
            "dense_vs_fast_protocol": round(dense_rate["pixels_per_second"] / fast, 2),
            "dense_vs_paper_protocol": round(dense_rate["pixels_per_second"] / paper, 2),
        },
        "targets": {
            "native stream >= 5x the (default, fast) ensemble's consumption": native_ratio_fast >= 5,
            "a subset reads only its own tap's bytes": subset_rate["feature_megabytes_read_per_buffer"]
            < native_rate["feature_megabytes_read_per_buffer"],
        },
    }


def main() -> None:
    arguments, scratch = command_line(__doc__)
    print(write_result("sampling_throughput", run(arguments.quick, scratch)))


if __name__ == "__main__":
    main()
