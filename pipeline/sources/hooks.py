"""Capturing decoder-block outputs with forward hooks scoped by a context manager."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch


class _StopForward(Exception):
    """Raised by the last needed hook: the rest of the UNet need not run."""


@contextlib.contextmanager
def capture_outputs(modules: Mapping[str, torch.nn.Module], stop_after: str | None = None) -> Iterator[dict]:
    """Records the output of each named module while the context is open.

    Args:
        modules: name → module to hook.
        stop_after: a name in `modules`; its hook aborts the forward pass once it has fired
            (use `run_until_captured` to call the model).

    Yields:
        A dict that fills with name → output tensor at every forward pass.
    """
    outputs: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str):
        def hook(module, inputs, output):
            outputs[name] = output[0] if isinstance(output, tuple) else output
            if name == stop_after:
                raise _StopForward

        return hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def run_until_captured(model: torch.nn.Module, *inputs) -> None:
    """Calls `model(*inputs)`, stopping quietly where `capture_outputs(stop_after=…)` says."""
    try:
        model(*inputs)
    except _StopForward:
        pass
