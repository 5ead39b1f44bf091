"""Choosing devices, autocast and thread counts (pipeline/runtime/devices.py)."""

import contextlib

import pytest
import torch

from pipeline.runtime.devices import autocast_for, has_native_bfloat16, pick_device, torch_threads


def test_an_explicit_device_is_used_as_given():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("cuda:1") == torch.device("cuda", 1)


def test_auto_falls_back_to_the_cpu_without_an_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")


def test_autocast_only_on_cuda():
    assert isinstance(autocast_for(torch.device("cpu")), contextlib.nullcontext)
    assert isinstance(autocast_for(torch.device("cuda")), torch.autocast)


def test_torch_threads_sets_and_restores_the_count():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(0):  # 0: leave torch's default
        assert torch.get_num_threads() == before


@pytest.mark.parametrize(
    "avx512_bf16, amx, expected",
    [(False, False, False), (True, False, True), (False, True, True)],
)
def test_native_bfloat16_on_a_cpu_follows_its_instruction_sets(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert has_native_bfloat16(torch.device("cpu")) is expected


@pytest.mark.parametrize("supported", [False, True])
def test_native_bfloat16_on_a_cuda_gpu_asks_cuda_without_emulation(monkeypatch, supported):
    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation: asked.append(including_emulation) or supported)
    assert has_native_bfloat16(torch.device("cuda")) is supported
    assert asked == [False]
