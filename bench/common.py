"""Shared pieces of the benchmarks: timing, peak memory of a child process, synthetic stores.

Every benchmark measures ratios side by side within one run, with torch and OpenMP on one
thread for both sides, and takes the median of repeats: the machine these numbers come from
is shared, so absolute times drift while ratios of interleaved measurements hold up better.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from pipeline.sources.adm.convert import AdmLayout
from pipeline.sources.base import TapShape
from pipeline.store.schema import StoreSchema
from pipeline.store.writer import open_store_for_writing

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED = PROJECT_ROOT.parent / "shared"
RESULTS_DIR = PROJECT_ROOT / "bench" / "results"

# The paper's features: ADM 256×256, steps 50/150/250, blocks 5, 6, 7, 8, 12 (8448 per pixel).
PAPER_STEPS = [50, 150, 250]
PAPER_TAP_SHAPES = [
    TapShape("adm.5", 1024, 32, 32),
    TapShape("adm.6", 512, 32, 32),
    TapShape("adm.7", 512, 32, 32),
    TapShape("adm.8", 512, 64, 64),
    TapShape("adm.12", 256, 128, 128),
]
PAPER_SIZE = 256
# The paper's 256×256 ADM (guided-diffusion flags of ffhq.pt / lsun_*.pt: num_channels 256,
# channel_mult 1,1,2,2,4,4, attention at 32,16,8, learn_sigma): 552 M parameters.
PAPER_LAYOUT = AdmLayout(
    in_channels=3,
    out_channels=6,
    level_channels=(256, 256, 512, 512, 1024, 1024),
    num_res_blocks=2,
    attention_levels=(False, False, False, True, True, True),
    scale_shift_norm=True,
    resblock_updown=True,
)
PAPER_CLASSES = 34  # ffhq_34: ≥ 30 classes, so the members' wide (256, 128) shape
# Quick mode: the same structure, tiny (D = 2 × (6 + 4 + 2) = 24).
TINY_STEPS = [50, 150]
TINY_TAP_SHAPES = [TapShape("adm.5", 6, 4, 4), TapShape("adm.8", 4, 8, 8), TapShape("adm.12", 2, 16, 16)]
TINY_SIZE = 16

CONTENTION_CAVEAT = (
    "Measured on a 2-core VM shared with other jobs: absolute times vary by 2x or more between "
    "runs; compare ratios of measurements taken side by side (same run, 1 thread each, median of "
    "repeats), not absolute times across runs or machines."
)


def environment() -> dict:
    """Where and how a result was measured."""
    return {
        "measured": time.strftime("%Y-%m-%d %H:%M"),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "caveat": CONTENTION_CAVEAT,
    }


def median_seconds(function: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    """Runs `function` `repeats` times; returns the median and every time, in seconds."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times), [round(value, 4) for value in times]


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far.

    Read from /proc/self/status (VmHWM: the high-water mark of this address space), not from
    getrusage: ru_maxrss of a child started by subprocess begins at its parent's RSS at the
    time of the fork (Linux carries it over through exec), so a child of a large runner would
    report the runner's memory as its own peak.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def current_rss_bytes() -> int:
    """This process's resident memory now."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_child(module: str, arguments: dict, timeout: float = 3600, threads: int = 1) -> dict:
    """Runs `python -m module --child JSON` in a fresh process (its own peak RSS), on `threads`
    OpenMP threads, and returns the JSON object it prints last."""
    environment_variables = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(PROJECT_ROOT)}
    completed = subprocess.run(
        [sys.executable, "-m", module, "--child", json.dumps(arguments)],
        cwd=PROJECT_ROOT, env=environment_variables, capture_output=True, text=True, timeout=timeout,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{module} child failed ({completed.returncode}):\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def synthetic_labels(size: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """A label map of rectangular regions covering every pixel, int64 (size, size)."""
    cells = max(1, size // 32)
    coarse = rng.integers(0, num_classes, size=(cells, cells))
    return np.kron(coarse, np.ones((size // cells, size // cells), dtype=np.int64))[:size, :size]


def synthetic_activations(
    tap_shapes: Sequence[TapShape], steps: Sequence[int], rng: np.random.Generator
) -> dict[str, torch.Tensor]:
    """Random feature maps at the given shapes: tap name → float32 (T, C, h, w)."""
    return {
        shape.name: torch.from_numpy(
            rng.standard_normal((len(steps), shape.channels, shape.height, shape.width), dtype=np.float32)
        )
        for shape in tap_shapes
    }


def synthetic_schema(
    layout: str, num_images: int, size: int, tap_shapes: Sequence[TapShape], steps: Sequence[int], num_classes: int
) -> StoreSchema:
    return StoreSchema(
        layout=layout,
        image_size=size,
        steps=list(steps),
        tap_shapes=list(tap_shapes),
        source={"kind": "synthetic activations", "checkpoint_sha256": "0" * 64, "noise_seed": 0},
        image_names=[f"synthetic_{index:04d}" for index in range(num_images)],
        image_sha256=["0" * 64] * num_images,
        classes={"names": [f"class_{k}" for k in range(num_classes)], "ignore_label": 255},
    )


def write_synthetic_store(
    path: Path,
    layout: str,
    num_images: int,
    size: int = PAPER_SIZE,
    tap_shapes: Sequence[TapShape] = PAPER_TAP_SHAPES,
    steps: Sequence[int] = PAPER_STEPS,
    num_classes: int = PAPER_CLASSES,
    codec: str = "blosc-lz4",
    seed: int = 0,
) -> Path:
    """A complete labeled store of random activations at real shapes (reused when complete)."""
    schema = synthetic_schema(layout, num_images, size, tap_shapes, steps, num_classes)
    writer = open_store_for_writing(path, schema, codec, replace_mismatched=True)
    rng = np.random.default_rng(seed)
    for index in writer.pending_images():
        image = np.zeros((size, size, 3), dtype=np.uint8)
        writer.write_image(index, image, synthetic_labels(size, num_classes, rng), synthetic_activations(tap_shapes, steps, rng))
    return path


def extraction_timings(settings, device: str, count: int, repeats: int, times: dict[str, list[float]]) -> dict:
    """The part of an extraction benchmark's result every one reports: what ran (images, size,
    steps, taps, batch, device, repeats), each measurement's seconds and its median images/s."""
    return {
        "images": count,
        "size": settings.size,
        "steps": settings.steps,
        "blocks": settings.blocks,
        "batch_size": settings.batch_size,
        "device": device,
        "repeats": repeats,
        "seconds": {name: [round(value, 3) for value in values] for name, values in times.items()},
        "images_per_second": {name: round(count / statistics.median(values), 3) for name, values in times.items()},
    }


def directory_bytes(path: Path) -> int:
    """Bytes of the files under `path`, each hardlinked file counted once (as `du` does)."""
    sizes = {}
    for entry in Path(path).rglob("*"):
        if entry.is_file() and not entry.is_symlink():
            status = entry.stat()
            sizes[(status.st_dev, status.st_ino)] = status.st_size
    return sum(sizes.values())


def write_result(name: str, result: dict, out_dir: Path = RESULTS_DIR) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps({"environment": environment(), **result}, indent=1) + "\n")
    return path


def child_benchmark_main(name: str, description: str, run: Callable[[bool, Path], dict],
                         child: Callable[[dict], dict]) -> None:
    """The command line of a benchmark that measures fresh child processes: `--child JSON` runs
    `child` and prints its JSON result (what `run_child` reads); otherwise `run` writes the result."""
    arguments, scratch = command_line(description, child=True)
    if arguments.child:
        print(json.dumps(child(json.loads(arguments.child))))
        return
    print(write_result(name, run(arguments.quick, scratch)))


def command_line(
    description: str, child: bool = False, add_options: Callable[[argparse.ArgumentParser], None] | None = None
) -> tuple[argparse.Namespace, Path]:
    """A benchmark script's arguments: --quick, --scratch (created), --child when it forks
    measured children, and its own options; returns them with the scratch folder."""
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    if child:
        parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", default=str(PROJECT_ROOT / "runs" / "bench-scratch"))
    if add_options is not None:
        add_options(parser)
    arguments = parser.parse_args()
    scratch = Path(arguments.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    return arguments, scratch
