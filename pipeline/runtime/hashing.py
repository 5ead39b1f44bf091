"""File checksums: what checkpoints, images and downloads are recognised by.

Here, below every package, so that a feature source can record its checkpoint's hash without
depending on the image-folder code that once held this helper.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file (read in blocks by `hashlib.file_digest`: memory stays flat for
    checkpoints of gigabytes)."""
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()
