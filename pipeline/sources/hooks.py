"""Capturing named modules' outputs with forward hooks scoped by a context manager."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch


class _StopForward(Exception):
    """Raised once every hooked module has fired: the rest of the model need not run."""


@contextlib.contextmanager
def capture_outputs(modules: Mapping[str, torch.nn.Module], stop_when_all_captured: bool = False) -> Iterator[dict]:
    """Records the output of each named module (its first tensor if it returns a tuple) while the
    context is open.

    Args:
        modules: name → module to hook.
        stop_when_all_captured: abort the forward pass as soon as every module has fired since
            the dict was last cleared (call the model with `run_until_captured`).

    Yields:
        A dict that fills with name → output tensor at every forward pass; clear it before each
        pass when stopping early.
    """
    outputs: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str):
        def hook(module, inputs, output):
            outputs[name] = output[0] if isinstance(output, tuple) else output
            if stop_when_all_captured and len(outputs) == len(modules):
                raise _StopForward

        return hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def run_until_captured(model: torch.nn.Module, *inputs, **keywords) -> None:
    """Calls `model(*inputs)`, stopping quietly where `capture_outputs(stop_when_all_captured=True)` stops it."""
    try:
        model(*inputs, **keywords)
    except _StopForward:
        pass
