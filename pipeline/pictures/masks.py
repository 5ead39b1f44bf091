"""Colour-coded label maps, overlays and uncertainty maps as uint8 arrays."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

BACKGROUND_COLOUR = (48, 48, 48)  # label 0: dark grey, so black-on-black edges stay visible
IGNORE_COLOUR = (255, 255, 255)  # no palette colour is white


UNCERTAINTY_COLOURMAP = "magma"


def class_palette(num_classes: int) -> np.ndarray:
    """Distinct colours for label maps: dark grey background, then tableau colours.

    Label 0 is dark grey; labels 1.. take matplotlib's tab10 colours, then tab20's light
    shades, tab20b and tab20c (greys left out, so none reads as background or ignore); past
    those 54, each new colour is the one of an RGB grid farthest from all colours so far.

    Args:
        num_classes: How many colours, 1 to 256.

    Returns:
        (num_classes, 3) uint8 RGB, all rows different and none white.

    Raises:
        ValueError: ``num_classes`` is outside 1..256.
    """
    if not 1 <= num_classes <= 256:
        raise ValueError(f"num_classes must lie in 1..256, got {num_classes}")
    named = np.concatenate([np.array([BACKGROUND_COLOUR], dtype=np.uint8), _tableau_colours()])
    extra_count = max(0, num_classes - len(named))
    return np.concatenate([named, _farthest_point_colours(named, extra_count)])[:num_classes]


def colour_mask(
    labels: np.ndarray, palette: np.ndarray, ignore_label: int | None = 255
) -> np.ndarray:
    """Paints a label map with the palette.

    Args:
        labels: (H, W) integer label map.
        palette: (C, 3) uint8 colours, row ``c`` for label ``c``.
        ignore_label: Label painted white; None when there is none.

    Returns:
        (H, W, 3) uint8 RGB.

    Raises:
        ValueError: A label (other than ``ignore_label``) has no palette colour.
    """
    _check_labels(labels, palette, ignore_label)
    ignored = _ignore_mask(labels, ignore_label)
    coloured = palette[np.where(ignored, 0, labels)]
    coloured[ignored] = IGNORE_COLOUR
    return coloured


def overlay(
    image: np.ndarray,
    labels: np.ndarray,
    palette: np.ndarray,
    alpha: float = 0.5,
    ignore_label: int | None = 255,
    background_label: int | None = 0,
) -> np.ndarray:
    """Blends class colours over an image, leaving background and ignored pixels untouched.

    Args:
        image: (H, W, 3) uint8 RGB.
        labels: (H, W) integer label map.
        palette: (C, 3) uint8 colours.
        alpha: Weight of the class colour, in [0, 1].
        ignore_label: Label left unpainted; None when there is none.
        background_label: Label left unpainted; None to paint every class.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[:2] != labels.shape:
        raise ValueError(
            f"need image (H, W, 3) and labels (H, W), got {image.shape} and {labels.shape}"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    colours = colour_mask(labels, palette, ignore_label).astype(np.float32)
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colours
    painted = ~_ignore_mask(labels, ignore_label)
    if background_label is not None:
        painted &= labels != background_label
    return np.where(painted[..., None], np.rint(blended), image).astype(np.uint8)


def uncertainty_image(values: np.ndarray, max_value: float | None = None) -> np.ndarray:
    """Colours a non-negative per-pixel uncertainty with the perceptual 'magma' colour map.

    Args:
        values: (H, W) float, e.g. the ensemble's entropy or disagreement.
        max_value: Value mapped to the brightest colour; defaults to ``values.max()``, so
            give one shared value to compare several images.

    Returns:
        (H, W, 3) uint8 RGB; 0 is magma's darkest colour (near black).

    Raises:
        ValueError: ``values`` is not 2-D, holds NaN, or is negative.
    """
    if values.ndim != 2:
        raise ValueError(f"values must be a 2-D (H, W) array, got shape {values.shape}")
    if np.isnan(values).any() or values.min() < 0:
        raise ValueError(f"uncertainty must be non-negative and not NaN, got min {values.min()}")
    top = float(values.max()) if max_value is None else float(max_value)
    scaled = np.clip(values / top, 0.0, 1.0) if top > 0 else np.zeros_like(values, dtype=float)
    rgba = matplotlib.colormaps[UNCERTAINTY_COLOURMAP](scaled)  # (H, W, 4) float in [0, 1]
    return np.rint(rgba[..., :3] * 255.0).astype(np.uint8)


def save_png(path: Path | str, array: np.ndarray) -> None:
    """Writes a (H, W) or (H, W, 3) uint8 array as a PNG, creating missing parent folders."""
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"need a (H, W) or (H, W, 3) uint8 array, got {array.dtype} {array.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _tableau_colours() -> np.ndarray:
    """(54, 3) uint8: tab10, tab20's light shades, tab20b and tab20c, greys left out."""
    tab20 = matplotlib.colormaps["tab20"].colors
    groups = [
        matplotlib.colormaps["tab10"].colors,
        tab20[1::2],  # light shades; the dark ones equal tab10
        matplotlib.colormaps["tab20b"].colors,
        matplotlib.colormaps["tab20c"].colors,
    ]
    colours = np.rint(np.concatenate([np.asarray(group) for group in groups]) * 255.0)
    greys = (colours.max(axis=1) - colours.min(axis=1)) == 0
    return colours[~greys].astype(np.uint8)


def _farthest_point_colours(chosen: np.ndarray, count: int) -> np.ndarray:
    """(count, 3) uint8: colours from a 16-level RGB grid, each the farthest from all before.

    Args:
        chosen: (K, 3) uint8 colours already taken (the new ones keep away from them too).
        count: How many new colours.
    """
    levels = np.linspace(0.0, 255.0, 16)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(-1, 3)
    anchors = np.concatenate([chosen.astype(float), [IGNORE_COLOUR]])
    nearest = np.linalg.norm(grid[:, None] - anchors[None], axis=-1).min(axis=1)  # (4096,)
    picked = []
    for _ in range(count):
        best = int(np.argmax(nearest))  # first maximum: deterministic
        picked.append(grid[best])
        nearest = np.minimum(nearest, np.linalg.norm(grid - grid[best], axis=1))
    return np.rint(np.array(picked).reshape(count, 3)).astype(np.uint8)


def _ignore_mask(labels: np.ndarray, ignore_label: int | None) -> np.ndarray:
    """(H, W) bool: where ``labels`` equals the ignore label (all False without one)."""
    if ignore_label is None:
        return np.zeros(labels.shape, dtype=bool)
    return labels == ignore_label


def _check_labels(labels: np.ndarray, palette: np.ndarray, ignore_label: int | None) -> None:
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 2-D integer array, got {labels.dtype} {labels.shape}")
    values = np.unique(labels[~_ignore_mask(labels, ignore_label)])
    unknown = values[(values < 0) | (values >= len(palette))]
    if len(unknown):
        raise ValueError(
            f"labels {unknown.tolist()} have no colour in a palette of {len(palette)} classes "
            f"(ignore label {ignore_label})"
        )



def save_index_png(path: Path | str, labels: np.ndarray) -> None:
    """A label map as an index PNG, each pixel its class index (8-bit, or 16-bit past 255): the
    mask format labeling tools import."""
    array = labels.astype(np.uint8) if labels.max(initial=0) <= 255 else labels.astype(np.uint16)
    Image.fromarray(array).save(path)  # mode L, or I;16
