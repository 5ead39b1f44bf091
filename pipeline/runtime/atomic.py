"""Writing a file or a folder so that a reader, or a kill, never sees half of it.

Both helpers give the body a staging path beside the target (same file system, so renames are
atomic) and move it into place only when the body finishes without an error; on an error the
staging copy is removed and the target is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replaced_file(target: Path) -> Iterator[Path]:
    """A staging file path for the body to write; it then replaces `target` in one rename.

    The staging name is fixed (`.<name>.tmp`), so what a killed writer left is overwritten by
    the next one instead of piling up. One writer per target at a time.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp")
    try:
        yield staging
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)


@contextlib.contextmanager
def replaced_folder(target: Path) -> Iterator[Path]:
    """A fresh staging folder for the body to fill; it then replaces `target`: the old folder is
    renamed aside, the new one renamed in, the old one deleted. A kill in between leaves the
    old folder beside the target (`.<name>.old`), never a half-written one in its place."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        if target.exists():
            retired = target.with_name(f".{target.name}.old")
            shutil.rmtree(retired, ignore_errors=True)
            target.rename(retired)
            staging.rename(target)
            shutil.rmtree(retired)
        else:
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
