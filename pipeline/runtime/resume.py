"""Resuming a stopped training run: its saved state, refused when it was made with other settings."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch


def run_differences(saved: dict, wanted: dict, prefix: str = "") -> list[str]:
    """'key: saved → wanted' for every leaf of two nested run records that differs (an `images`
    list is shown by its length)."""
    lines = []
    for key in sorted(set(saved) | set(wanted)):
        old, new = saved.get(key), wanted.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            lines += run_differences(old, new, f"{prefix}{key}.")
        elif old != new:
            shown = [f"{len(value)} images" if key == "images" and isinstance(value, list) else value for value in (old, new)]
            lines.append(f"{prefix}{key}: {shown[0]!r} → {shown[1]!r}")
    return lines


def load_run_state(path: Path, run: dict, what: str, upgrade: Callable[[dict], dict] | None = None) -> dict | None:
    """The state a stopped run saved at `path` (a `torch.save`d dict whose "run" is its record),
    or None when there is none.

    Args:
        path: the state file.
        run: this run's record (settings, data): the saved one must equal it.
        what: what trains, for the message ("a segmenter training").
        upgrade: applied to the saved record before the comparison (e.g. settings added since
            it was saved, at their defaults, which train what the saved run trained).

    Raises:
        FileExistsError: the saved run had another record; the message lists the differences.
    """
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if upgrade is not None:
        state["run"] = upgrade(state["run"])
    if state["run"] != run:
        raise FileExistsError(
            f"{path.parent.parent} holds {what} with other settings or data "
            f"({'; '.join(run_differences(state['run'], run))}); give another output folder, or delete {path.parent} "
            "to start over"
        )
    return state
