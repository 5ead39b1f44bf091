"""Extracting the raw-pixel baseline into an ordinary feature store (`sources.pixels.PixelSource`)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from pipeline.data.folders import ClassInfo
from pipeline.extraction.extract import extract_with_runner
from pipeline.extraction.runners import InProcessBatches
from pipeline.sources.pixels import PixelSource
from pipeline.store.writer import ExtractionSummary


def extract_pixel_features(
    images_dir: str | Path,
    store_path: str | Path,
    size: int | list[int],
    neighbourhood: int = 3,
    classes: ClassInfo | None = None,
    replace_mismatched: bool = False,
    show_progress: bool = True,
    code_sha256: str | None = None,
) -> ExtractionSummary:
    """Writes the raw-pixel baseline features of a folder of images into a native store."""
    return extract_with_runner(
        lambda: contextlib.nullcontext(InProcessBatches(PixelSource(neighbourhood))), images_dir, store_path, size,
        classes=classes, replace_mismatched=replace_mismatched, show_progress=show_progress, code_sha256=code_sha256,
    )
