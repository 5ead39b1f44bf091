"""DVC stage entry points (`python -m stages.<name>`), run by `dvc repro` from the project root."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from pipeline.store.locations import location_bytes

DATA_FOLDER = "data"


def loaded_code_sha256() -> str:
    """sha256 over the project's source files this process has imported so far (`pipeline`,
    `stages`), in name order: what a stage records in its store, so that DVC re-running it after a
    code change rebuilds the store instead of resuming the old one."""
    digest = hashlib.sha256()
    for name in sorted(sys.modules):
        file = getattr(sys.modules[name], "__file__", None)
        if name.split(".")[0] in ("pipeline", "stages") and file:
            digest.update(name.encode())
            digest.update(Path(file).read_bytes())
    return digest.hexdigest()


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
