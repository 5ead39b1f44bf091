"""Target 6: what DVC's bookkeeping of a feature store costs in time and disk, per setting.

A fresh DVC project per variant holds one stage whose command produces a native store at the
paper's shapes (a copy of a prepared synthetic store, so the stage's own work is only the
copy); `dvc repro` time minus the command's own time is DVC's overhead (hashing, caching,
linking). Disk use is the project's total (workspace + .dvc/cache). Variants: the output
cached with DVC's default link type (copy here), cached as hardlinks, and not cached
(`cache: false`, `persist: true`: the setting dvc.yaml uses for stores).

The overhead is then set against extraction time per image: measured on this CPU at the
paper's size (store_size.json) and the GPU figure in NOTES.md (≤ 35 ms per forward, 3 steps).

    python -m bench.dvc_overhead [--quick] [--images 20]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.common import (
    PROJECT_ROOT,
    RESULTS_DIR,
    TINY_BLOCK_SHAPES,
    TINY_STEPS,
    directory_bytes,
    write_result,
    write_synthetic_store,
)

DVC = [sys.executable, "-m", "dvc"]
VARIANTS = {
    "cached (copy)": ({"cache": True, "persist": True}, "copy"),
    "cached (hardlink)": ({"cache": True, "persist": True}, "hardlink"),
    "not cached (cache: false, persist: true)": ({"cache": False, "persist": True}, None),
}
GPU_SECONDS_PER_IMAGE = 3 * 0.035  # NOTES.md: ≤ 35 ms per 256×256 ADM forward on a GPU, 3 steps


def timed(command: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed in {cwd}:\n{completed.stdout[-2000:]}\n{completed.stderr[-2000:]}")
    return time.perf_counter() - started


def measure_variant(source: Path, project: Path, out_flags: dict, link_type: str | None) -> dict:
    shutil.rmtree(project, ignore_errors=True)
    project.mkdir(parents=True)
    timed([*DVC, "init", "--no-scm", "-q"], project)
    if link_type:
        timed([*DVC, "config", "cache.type", link_type], project)
    copy_command = f"{sys.executable} -c \"import shutil; shutil.copytree(r'{source}', 'store.zarr')\""
    stage = {"stages": {"extract": {"cmd": copy_command, "outs": [{"store.zarr": out_flags}]}}}
    (project / "dvc.yaml").write_text(json.dumps(stage))
    command_seconds = timed(["bash", "-c", copy_command + " && rm -rf store.zarr"], project)
    repro_seconds = timed([*DVC, "repro", "-q"], project)
    status_seconds = timed([*DVC, "status", "-q"], project)
    return {
        "command_seconds": round(command_seconds, 2),
        "repro_seconds": round(repro_seconds, 2),
        "overhead_seconds": round(repro_seconds - command_seconds, 2),
        "status_seconds_after": round(status_seconds, 2),
        "disk_bytes": directory_bytes(project),
        "store_bytes": directory_bytes(project / "store.zarr"),
    }


def run(quick: bool, scratch: Path, images: int = 20) -> dict:
    scratch = Path(scratch).resolve()  # the stage's command runs inside the DVC project
    if quick:
        source = write_synthetic_store(scratch / "dvc-source.zarr", "native", 2, 16, TINY_BLOCK_SHAPES, TINY_STEPS, 3)
        images = 2
    else:
        source = write_synthetic_store(scratch / "dvc-source.zarr", "native", images)
    variants = {}
    for name, (flags, link_type) in VARIANTS.items():
        variants[name] = measure_variant(source, scratch / "dvc-project", flags, link_type)
        variants[name]["disk_vs_store"] = round(variants[name]["disk_bytes"] / variants[name]["store_bytes"], 3)
        print(name, variants[name], flush=True)
    shutil.rmtree(scratch / "dvc-project", ignore_errors=True)
    store_size = RESULTS_DIR / "store_size.json"
    cpu_seconds = json.loads(store_size.read_text())["layouts"]["native"]["seconds_per_image"] if store_size.is_file() else None
    chosen = variants["not cached (cache: false, persist: true)"]
    per_image_overhead = {name: value["overhead_seconds"] / images for name, value in variants.items()}
    return {
        "what": "dvc repro overhead (hashing, caching, linking) and disk use for a native store output",
        "images": images,
        "store_bytes": chosen["store_bytes"],
        "variants": variants,
        "overhead_seconds_per_image": {name: round(value, 3) for name, value in per_image_overhead.items()},
        "extraction_seconds_per_image": {"cpu_paper_size_measured": cpu_seconds, "gpu_estimate": GPU_SECONDS_PER_IMAGE},
        "overhead_fraction_of_extraction": {
            name: {
                "cpu": None if cpu_seconds is None else round(value / cpu_seconds, 4),
                "gpu_estimate": round(value / GPU_SECONDS_PER_IMAGE, 3),
            }
            for name, value in per_image_overhead.items()
        },
        "targets": {
            "no doubled disk (chosen setting)": chosen["disk_vs_store"] < 1.1,
            "overhead <= 10 % of CPU extraction (chosen setting)": cpu_seconds is None
            or per_image_overhead["not cached (cache: false, persist: true)"] <= 0.1 * cpu_seconds,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--scratch", default=str(PROJECT_ROOT / "runs" / "bench-scratch"))
    arguments = parser.parse_args()
    scratch = Path(arguments.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    print(write_result("dvc_overhead", run(arguments.quick, scratch, arguments.images)))


if __name__ == "__main__":
    main()
