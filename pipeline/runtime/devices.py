"""Choosing where tensors compute."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def pick_device(requested: str = "auto") -> torch.device:
    """The device to run on: "auto" picks cuda, then mps, then cpu; anything else is used as given."""
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_for(device: torch.device):
    """float16 autocast on a CUDA GPU (as guided-diffusion's use_fp16); full precision elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def has_native_bfloat16(device: torch.device) -> bool:
    """Whether `device` computes in bfloat16 natively: CPUs with AVX-512 BF16 or AMX, CUDA GPUs
    from Ampere on; other devices are assumed to.

    Elsewhere torch emulates bfloat16 arithmetic: measured on this project's AVX2 build machine,
    a DDPM training step took 29.3 s in bfloat16 autocast against 2.4 s in float32
    (bench/results/pretrain_speed.json).
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return True
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, hence getattr
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Runs the body with `count` CPU threads for torch (0: leave torch's default), then restores.

    Small matrix products (the pixel MLPs at batch 64) run no faster on 2 threads than on 1,
    and far slower when another process keeps a core busy: OpenMP threads then wait on each
    other (measured here: 1.2 s on 1 thread, 24-34 s on 2 for the same training epoch).
    """
    previous = torch.get_num_threads()
    if count > 0:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
