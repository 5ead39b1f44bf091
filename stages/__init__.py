"""DVC stage entry points (`python -m stages.<name>`), run by `dvc repro` from the project root."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.store.locations import location_bytes

DATA_FOLDER = "data"


def size_on_disk(path: str | Path) -> str:
    """What a stage wrote, for its one-line summary: "12.3 MB"."""
    return f"{location_bytes(Path(path)) / 1e6:,.1f} MB"


def output_path(text: str) -> Path:
    """A path a stage writes to, refused unless it lies inside the project's data folder.

    Stages delete and replace their outputs, so a mistyped or hostile path in dvc.yaml (`/`,
    `~/photos`, `data/../..`) must never reach them. The check is on the path as written, made
    absolute with `..` collapsed; symlinks are not followed, so `data/` itself may be a link to a
    bigger disk.

    Raises:
        ValueError: naming the path and the folder it must lie in.
    """
    root = Path(os.path.abspath(DATA_FOLDER))
    target = Path(os.path.abspath(text))  # abspath collapses ".." without following symlinks
    if root not in target.parents:
        raise ValueError(
            f"refusing to write {text!r}: stages write only inside {root}{os.sep} (the project's data folder)"
        )
    return Path(text)
