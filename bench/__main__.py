"""Runs every benchmark, writes bench/results/<name>.json and the summary table.

    python -m bench                  # full size (about an hour on a 2-core CPU)
    python -m bench --quick          # tiny shapes, about a minute; results in runs/bench-quick/
    python -m bench --only training_speed sampling_throughput

Big temporary stores (up to ~2.5 GB) go under runs/bench-scratch/ and are deleted at the end.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shutil
import time
from pathlib import Path

import torch

from bench.common import PROJECT_ROOT, RESULTS_DIR, write_result
from bench.report import write_summary

BENCHMARKS = [
    "storage_codecs",  # 5: bytes per image per layout and codec
    "store_size",  # 5: the same at the paper's size (552 M-parameter ADM)
    "extraction_overhead",  # 1: extract stage vs bare forwards
    "extraction_gpu_rate",  # 20: the store writer at GPU rates, against the disk
    "extraction_gpu",  # 20.4: the paper's ADM-256 on a GPU, bare forwards vs extraction (skipped without CUDA)
    "latent_extraction",  # 1 (issue 17.3): the same for a latent-diffusion (SD-shaped) folder
    "training_speed",  # 3: fast vs paper protocol
    "fast_protocol_classes",  # 3: the same per class, on validation images
    "sampling_throughput",  # 4: stream vs ensemble consumption
    "training_memory",  # 2: peak RSS vs training images
    "evaluation_streaming",  # 7: peak RSS vs test images
    "inference_speed",  # 7: first layer at native resolution vs upsampled features
    "refine_speed",  # 19: mask-prior refinement vs the ensemble's prediction
    "dvc_overhead",  # 6: DVC bookkeeping of stores
    "pretrain_speed",  # DDPM pretraining step, float32 vs bfloat16
    "segmenter_speed",  # 27: the distilled segmenter vs extract + ensemble per test image
    "select_scale",  # 29.1: select on the paper's ADM-256 superset (53,760 features) in bounded memory
    "thread_defaults",  # 29.3: each stage at 1 and 2 threads, quiet and beside a busy process
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes: checks that everything runs")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these")
    parser.add_argument("--out", type=Path, help="results folder (default: bench/results, or runs/bench-quick with --quick)")
    parser.add_argument("--scratch", type=Path, default=PROJECT_ROOT / "runs" / "bench-scratch")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out_dir = arguments.out or (PROJECT_ROOT / "runs" / "bench-quick" if arguments.quick else RESULTS_DIR)
    torch.set_num_threads(1)  # both sides of every ratio on one thread
    arguments.scratch.mkdir(parents=True, exist_ok=True)
    try:
        for name in arguments.only or BENCHMARKS:
            started = time.perf_counter()
            module = importlib.import_module(f"bench.{name}")
            result = module.run(arguments.quick, arguments.scratch)
            result["benchmark_seconds"] = round(time.perf_counter() - started, 1)
            print(f"{name}: {write_result(name, result, out_dir)} ({result['benchmark_seconds']} s)", flush=True)
    finally:
        shutil.rmtree(arguments.scratch, ignore_errors=True)
    print(write_summary(out_dir))


if __name__ == "__main__":
    main()
