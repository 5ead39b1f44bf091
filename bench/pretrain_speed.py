"""Seconds per DDPM pretraining step in float32 and in bfloat16 autocast, on this machine's CPU.

The demo DDPM's shape (3.0 M parameters, 32×32, batch 32; quick: a 4-level model, 16×16, batch 2).
Whether bfloat16 pays depends on the CPU: with AVX-512 BF16 or AMX it is computed natively,
without them torch emulates it. Results: bench/results/pretrain_speed.json.

    python -m bench.pretrain_speed [--quick]
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from bench.common import command_line, median_seconds, write_result
from pipeline.pretrain.settings import PretrainSettings
from pipeline.pretrain.training import TrainingRun
from pipeline.runtime.devices import has_native_bfloat16

DEMO = PretrainSettings(
    image_size=32, block_out_channels=[32, 32, 64, 64, 64], attention_levels=[3, 4], batch_size=32, device="cpu"
)
QUICK = PretrainSettings(
    image_size=16, block_out_channels=[32, 32, 32, 32], attention_levels=[3], batch_size=2, device="cpu"
)


def seconds_per_step(settings: PretrainSettings, repeats: int) -> tuple[float, list[float]]:
    """Median wall time of one optimiser step (after one warm-up step) on random images."""
    images = torch.randint(0, 256, (64, 3, settings.image_size, settings.image_size), dtype=torch.uint8)
    run = TrainingRun.create(settings, torch.device("cpu"), len(images), "benchmark")  # the loop without its I/O
    run.train_step(images)
    return median_seconds(lambda: run.train_step(images), repeats)


def run(quick: bool, scratch: Path, repeats: int = 3) -> dict:
    settings = QUICK if quick else DEMO
    result = {
        "what": "seconds per pretrain step (1 thread), float32 vs bfloat16 autocast",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bfloat16": has_native_bfloat16(torch.device("cpu")),
        "model": {"block_out_channels": settings.block_out_channels, "batch_size": settings.batch_size,
                  "image_size": settings.image_size},
        "seconds_per_step": {},
        "all_seconds": {},
    }
    for precision in ("float32", "bfloat16"):
        median, every = seconds_per_step(dataclasses.replace(settings, precision=precision), 1 if quick else repeats)
        result["seconds_per_step"][precision] = round(median, 4)
        result["all_seconds"][precision] = every
    steps = result["seconds_per_step"]
    result["bfloat16_speedup"] = round(steps["float32"] / steps["bfloat16"], 3)
    return result


def main() -> None:
    arguments, scratch = command_line(__doc__)
    torch.set_num_threads(1)
    print(write_result("pretrain_speed", run(arguments.quick, scratch)))


if __name__ == "__main__":
    main()
