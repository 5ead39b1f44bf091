"""Issue 29.3: each stage's CPU thread count, quiet and beside another busy process.

On a 2-core machine torch's default is 2 threads. When another process keeps one core busy,
2 threads can be far slower than 1 (OpenMP threads wait on each other at every operation, and
one of them keeps losing its core). Each stage's compute is timed here at 1 and at 2 threads,
on a quiet machine and beside `--load` busy processes (plain Python loops), at the demo's shapes:

- extract / synthesize: the demo DDPM's forward pass (extract: batch 4; synthesize: batch 64,
  one sampling step);
- train: the ensemble's training step (10 members fused, 256 pixels each, 1,152 features:
  the selected taps);
- evaluate / predict: the ensemble's prediction of one 32² image from its block tables;
- refine: the refiner's training step (params.yaml: batch 8, width 32, 24² crops of 32²);
- segmenter: the distilled segmenter's training step (batch 8, width 32, 32²).
(fewshot's UNet forward is extract's; it defaulted to 1 thread before this measurement.)

Result: seconds per step for each (stage, threads, load), the slowdown of 2 threads against 1
under load, and which default holds up: bench/results/thread_defaults.json. The settings'
`threads` defaults (pipeline/config.py, params.yaml) follow it: 1 everywhere.

    python -m bench.thread_defaults [--load 1] [--repeats 5]
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from bench.common import PROJECT_ROOT, command_line, environment, write_result

DEMO_DDPM = PROJECT_ROOT / "data" / "checkpoints" / "demo_ddpm"
BUSY_LOOP = "while True: pass"


@contextlib.contextmanager
def busy_processes(count: int) -> Iterator[None]:
    """`count` processes that each keep a core busy while the block runs."""
    processes = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(count)]
    try:
        time.sleep(0.5 if count else 0)
        yield
    finally:
        for process in processes:
            process.kill()
            process.wait()


def kernels() -> dict[str, Callable[[], None]]:
    """One step of each stage's compute, at the demo's shapes (module docstring)."""
    from pipeline.heads.pixel_ensemble.ensemble import make_pixel_classifier
    from pipeline.heads.segmenter.architectures import build_network
    from pipeline.refine.denoiser import MaskDenoiser
    from pipeline.sources.checkpoints import load_backbone

    torch.manual_seed(0)
    unet = load_backbone(DEMO_DDPM).unet.eval()
    timestep = torch.tensor([50])
    small, large = torch.randn(4, 3, 32, 32), torch.randn(64, 3, 32, 32)

    def forward(batch: torch.Tensor) -> Callable[[], None]:
        def step() -> None:
            with torch.inference_mode():
                unet(batch, timestep)
        return step

    generator = torch.Generator().manual_seed(0)
    members = [make_pixel_classifier(1152, 8, generator, [128, 32]) for _ in range(10)]
    ensemble_optimizer = torch.optim.Adam([p for member in members for p in member.parameters()])
    pixels, targets = torch.randn(10, 256, 1152), torch.randint(0, 8, (10, 256))

    def train_step() -> None:
        loss = sum(torch.nn.functional.cross_entropy(member(batch), target)
                   for member, batch, target in zip(members, pixels, targets))
        ensemble_optimizer.zero_grad()
        loss.backward()
        ensemble_optimizer.step()

    for member in members:
        member.eval()
    test_pixels = torch.randn(32 * 32, 1152)

    def predict_step() -> None:
        with torch.inference_mode():
            torch.stack([member(test_pixels) for member in members]).softmax(dim=2).mean(dim=0)

    denoiser = MaskDenoiser(8 + 16, 8, 10, 32)
    denoiser_optimizer = torch.optim.Adam(denoiser.parameters())
    condition, noisy, mask_steps = torch.randn(8, 24, 24, 24), torch.randint(0, 8, (8, 24, 24)), torch.randint(0, 10, (8,))

    def refine_step() -> None:
        loss = torch.nn.functional.cross_entropy(denoiser(condition, noisy, mask_steps), noisy)
        denoiser_optimizer.zero_grad()
        loss.backward()
        denoiser_optimizer.step()

    segmenter = build_network("unet", 8, pretrained=False, width=32).train()
    segmenter_optimizer = torch.optim.Adam(segmenter.parameters())
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 8, (8, 32, 32))

    def segmenter_step() -> None:
        loss = torch.nn.functional.cross_entropy(segmenter(images), labels)
        segmenter_optimizer.zero_grad()
        loss.backward()
        segmenter_optimizer.step()

    return {"extract (UNet forward, batch 4)": forward(small), "synthesize (UNet forward, batch 64)": forward(large),
            "train (ensemble step)": train_step, "evaluate/predict (ensemble, one 32² image)": predict_step,
            "refine (refiner step)": refine_step, "segmenter (training step)": segmenter_step}


def seconds_per_step(step: Callable[[], None], threads: int, repeats: int, steps: int) -> float:
    torch.set_num_threads(threads)
    step()  # warm up at this thread count
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(steps):
            step()
        times.append((time.perf_counter() - started) / steps)
    return statistics.median(times)


def run(quick: bool, scratch: Path, load: int = 1, repeats: int = 5) -> dict:
    if not DEMO_DDPM.is_dir():
        return {"skipped": "no demo DDPM checkpoint"}
    steps = 2 if quick else 10
    repeats = 1 if quick else repeats
    rows = {}
    for name, step in kernels().items():
        row = {}
        for busy in (0, load):
            with busy_processes(busy):
                for threads in (1, 2):
                    row[f"threads {threads}, {busy} busy"] = round(seconds_per_step(step, threads, repeats, steps), 5)
        quiet_gain = row["threads 1, 0 busy"] / row["threads 2, 0 busy"]
        loaded_loss = row[f"threads 2, {load} busy"] / row[f"threads 1, {load} busy"]
        row |= {"speedup of 2 threads, quiet": round(quiet_gain, 2),
                "slowdown of 2 threads, loaded": round(loaded_loss, 2),
                "holds up": "1 thread" if loaded_loss > quiet_gain else "2 threads"}
        rows[name] = row
        print(name, json.dumps(row), flush=True)
    torch.set_num_threads(os.cpu_count() or 1)
    return {"environment": environment(), "cpu_count": os.cpu_count(), "busy_processes": load,
            "steps_per_measurement": steps, "repeats": repeats, "stages": rows}


def main() -> None:
    arguments, scratch = command_line(__doc__, add_options=lambda parser: (
        parser.add_argument("--load", type=int, default=1), parser.add_argument("--repeats", type=int, default=5)))
    print(write_result("thread_defaults", run(arguments.quick, scratch, arguments.load, arguments.repeats)))


if __name__ == "__main__":
    main()
