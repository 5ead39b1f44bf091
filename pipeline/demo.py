"""A tiny, self-contained demo dataset: scenes of handwritten digits on colour gradients.

Every scene is made from scikit-learn's bundled 8×8 digits (``load_digits``, 1,797 of them),
so nothing is downloaded. A scene holds 2–4 digits of varied size, position and colour on a
random two-colour gradient with mild noise; its label map gives, for every pixel, 0 for
background or 1 + the digit's value (11 classes).

Colour never gives the class away: a digit's colour is drawn from the same distribution as the
background colours, independently of its value, and only rejected when it is too close to the
background under it. Shape is the only cue, which is what diffusion features should capture.

The 1,797 digits are split by a seeded permutation into two disjoint halves: ``pool`` and
``train`` scenes use the first half, ``test`` scenes the second, so test digits are unseen
handwriting. Scene ``i`` of a split depends only on ``(seed, split, i)``: growing the pool does
not change the labeled scenes.

On disk this is the paper's dataset format::

    <out>/real/train/scene_0000.png + scene_0000.npy   (uint8 labels, same stem)
    <out>/real/test/...
    <out>/pool/scene_0000.png                          (unlabeled, for DDPM training)
    <out>/classes.json                                 {"num_classes", "ignore_label", ...}
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

logger = logging.getLogger(__name__)

CLASS_NAMES: tuple[str, ...] = (
    "background", "zero", "one", "two", "three", "four",
    "five", "six", "seven", "eight", "nine",
)
IGNORE_LABEL = 255

# Entropy words that keep the random streams of the digit split and of each split apart.
_STREAM_CODES = {"digits": 0, "pool": 1, "train": 2, "test": 3}
# A digit is drawn on a box one source pixel wider on each side, so strokes that touch the
# 8×8 frame still fade out smoothly instead of being cut.
_SOURCE_PADDING = 1
# Below this RGB distance (colours in [0, 1], maximum √3) from the background under it a
# candidate digit colour is rejected as too faint to see.
_MIN_COLOUR_DISTANCE = 0.5
_COLOUR_CANDIDATES = 16
_POSITION_CANDIDATES = 8
# Largest share of an earlier digit's box that a later one may cover when a better place exists.
_MAX_BOX_OVERLAP = 0.3
_NOISE_STD = 3.0 / 255.0


@dataclass(frozen=True)
class DemoSpec:
    """What to generate.

    Attributes:
        size: Side of the square scenes in pixels (at least 16).
        pool_images: Unlabeled scenes for DDPM training.
        train_images: Labeled few-shot training scenes.
        test_images: Labeled test scenes (held-out handwriting).
        seed: Seed of every random choice.
        min_digits: Fewest digits in a scene.
        max_digits: Most digits in a scene.
    """

    size: int = 32
    pool_images: int = 4000
    train_images: int = 20
    test_images: int = 64
    seed: int = 0
    min_digits: int = 2
    max_digits: int = 4

    def __post_init__(self) -> None:
        _check_scene_settings(self.size, self.min_digits, self.max_digits)
        for name in ("pool_images", "train_images", "test_images"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def load_digit_halves(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Splits scikit-learn's digits into two disjoint halves by a seeded permutation.

    Args:
        seed: Seed of the permutation.

    Returns:
        ``{"train": (digits, targets), "test": (digits, targets)}`` where ``digits`` is
        (N, 8, 8) float32 in [0, 1] and ``targets`` (N,) int64 in 0..9. ``train`` (used by the
        pool and train splits) gets the first 899 of the permuted digits, ``test`` the other 898.
    """
    # Imported here: every stage reads params.yaml through pipeline.config, which imports this
    # module, and scikit-learn takes ~2 s to import on a slow CPU.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    digits = (bunch.images / 16.0).astype(np.float32)  # (1797, 8, 8), source range 0..16
    targets = bunch.target.astype(np.int64)
    order = _stream_rng(seed, "digits").permutation(len(targets))
    half = (len(order) + 1) // 2
    return {
        "train": (digits[order[:half]], targets[order[:half]]),
        "test": (digits[order[half:]], targets[order[half:]]),
    }


def make_scene(
    rng: np.random.Generator,
    digits: np.ndarray,
    targets: np.ndarray,
    size: int,
    min_digits: int,
    max_digits: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Composes one scene: a colour gradient with digits drawn on top, later ones over earlier.

    Args:
        rng: The scene's random generator (all choices come from it).
        digits: (N, 8, 8) float grey digits, intensities in [0, 1].
        targets: (N,) int digit values in 0..9.
        size: Side of the scene in pixels (at least 16).
        min_digits: Fewest digits to draw (at least 1).
        max_digits: Most digits to draw.

    Returns:
        ``(image, labels)``: image (size, size, 3) uint8 RGB; labels (size, size) uint8 with 0
        for background and ``1 + value`` where a digit's upscaled intensity exceeds one half.
    """
    _check_scene_settings(size, min_digits, max_digits)
    _check_digits(digits, targets)
    canvas = _gradient_background(rng, size)  # (size, size, 3) float in [0, 1]
    labels = np.zeros((size, size), dtype=np.uint8)
    boxes: list[tuple[int, int, int]] = []  # (row, column, side) of each drawn digit
    for _ in range(int(rng.integers(min_digits, max_digits + 1))):
        index = int(rng.integers(len(targets)))
        side = _digit_box_side(rng, size)
        row, column = _choose_position(rng, size, side, boxes)
        boxes.append((row, column, side))
        intensity = _upscale_digit(digits[index], side)  # (side, side) float in [0, 1]
        window = (slice(row, row + side), slice(column, column + side))
        colour = _choose_colour(rng, canvas[window].reshape(-1, 3).mean(axis=0))
        # Smoothstep around 1/2: crisp strokes, anti-aliased edges, and alpha > 1/2 exactly
        # where the label says "digit", so labels and pixels agree.
        ramp = np.clip((intensity - 0.3) / 0.4, 0.0, 1.0)
        alpha = (ramp * ramp * (3.0 - 2.0 * ramp))[..., None]
        canvas[window] = canvas[window] * (1.0 - alpha) + colour * alpha
        labels[window][intensity > 0.5] = targets[index] + 1
    canvas += rng.normal(0.0, _NOISE_STD, size=canvas.shape)
    image = np.clip(np.rint(canvas * 255.0), 0, 255).astype(np.uint8)
    return image, labels


def write_demo_dataset(spec: DemoSpec, out_dir: Path) -> None:
    """Writes the pool, train and test splits and ``classes.json`` under ``out_dir``.

    Args:
        spec: What to generate.
        out_dir: Target folder; created if missing, refused if it already holds anything
            (stale scenes from a bigger earlier run would otherwise stay behind).

    Raises:
        FileExistsError: ``out_dir`` exists and is not empty.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"demo dataset folder is not empty: {out_dir}")
    halves = load_digit_halves(spec.seed)
    splits = (
        ("pool", spec.pool_images, out_dir / "pool", "train"),
        ("train", spec.train_images, out_dir / "real" / "train", "train"),
        ("test", spec.test_images, out_dir / "real" / "test", "test"),
    )
    for split, count, folder, half in splits:
        folder.mkdir(parents=True, exist_ok=True)
        digits, targets = halves[half]
        scenes = tqdm(range(count), desc=f"demo {split}", unit="scene", disable=split != "pool")
        for index in scenes:
            rng = _stream_rng(spec.seed, split, index)
            image, labels = make_scene(
                rng, digits, targets, spec.size, spec.min_digits, spec.max_digits
            )
            Image.fromarray(image).save(folder / f"scene_{index:04d}.png")
            if split != "pool":
                np.save(folder / f"scene_{index:04d}.npy", labels)
        logger.info("wrote %d %s scenes to %s", count, split, folder)
    classes = {
        "num_classes": len(CLASS_NAMES),
        "ignore_label": IGNORE_LABEL,
        "train": spec.train_images,
        "test": spec.test_images,
        "names": list(CLASS_NAMES),
    }
    (out_dir / "classes.json").write_text(json.dumps(classes, indent=1) + "\n")


def _stream_rng(seed: int, stream: str, index: int = 0) -> np.random.Generator:
    """A generator that depends only on (seed, stream, index)."""
    return np.random.default_rng([seed, _STREAM_CODES[stream], index])


def _check_scene_settings(size: int, min_digits: int, max_digits: int) -> None:
    if size < 16:
        raise ValueError(f"scene size must be at least 16 pixels, got {size}")
    if not 1 <= min_digits <= max_digits:
        raise ValueError(
            f"need 1 <= min_digits <= max_digits, got min_digits={min_digits}, "
            f"max_digits={max_digits}"
        )


def _check_digits(digits: np.ndarray, targets: np.ndarray) -> None:
    if digits.ndim != 3 or digits.shape[1:] != (8, 8):
        raise ValueError(f"digits must have shape (N, 8, 8), got {digits.shape}")
    if targets.shape != (len(digits),) or len(digits) == 0:
        raise ValueError(
            f"targets must have shape ({len(digits)},) with N > 0, got {targets.shape}"
        )
    if digits.min() < 0.0 or digits.max() > 1.0:
        raise ValueError(
            f"digit intensities must lie in [0, 1], got [{digits.min()}, {digits.max()}]"
        )
    if targets.min() < 0 or targets.max() > 9:
        raise ValueError(f"targets must lie in 0..9, got [{targets.min()}, {targets.max()}]")


def _random_colours(rng: np.random.Generator, count: int) -> np.ndarray:
    """(count, 3) float RGB in [0, 1]: the one distribution of background and digit colours."""
    return rng.uniform(0.0, 1.0, size=(count, 3))


def _gradient_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float: a linear blend of two random colours along a random direction."""
    start, end = _random_colours(rng, 2)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    rows, columns = np.mgrid[0:size, 0:size] / (size - 1)
    position = rows * np.sin(angle) + columns * np.cos(angle)
    position = (position - position.min()) / (position.max() - position.min())
    return start + position[..., None] * (end - start)


def _digit_box_side(rng: np.random.Generator, size: int) -> int:
    """Side of the drawn box: the digit body is size/4..size/2 pixels, plus its padding."""
    body = int(rng.integers(round(size / 4), round(size / 2) + 1))
    return round(body * (8 + 2 * _SOURCE_PADDING) / 8)


def _choose_position(
    rng: np.random.Generator, size: int, side: int, boxes: list[tuple[int, int, int]]
) -> tuple[int, int]:
    """Top-left corner of a new box: the first candidate that hides little of earlier boxes.

    Falls back to the candidate with the least overlap, so digits may still partly overlap.
    """
    corners = rng.integers(0, size - side + 1, size=(_POSITION_CANDIDATES, 2))
    worst_overlaps = np.zeros(len(corners))
    for row, column, old_side in boxes:
        height = np.clip(np.minimum(corners[:, 0] + side, row + old_side)
                         - np.maximum(corners[:, 0], row), 0, None)
        width = np.clip(np.minimum(corners[:, 1] + side, column + old_side)
                        - np.maximum(corners[:, 1], column), 0, None)
        worst_overlaps = np.maximum(worst_overlaps, height * width / old_side**2)
    acceptable = np.flatnonzero(worst_overlaps <= _MAX_BOX_OVERLAP)
    chosen = acceptable[0] if len(acceptable) else int(np.argmin(worst_overlaps))
    return int(corners[chosen, 0]), int(corners[chosen, 1])


def _upscale_digit(digit: np.ndarray, side: int) -> np.ndarray:
    """(side, side) float in [0, 1]: the padded 8×8 digit resized bicubically."""
    padded = np.zeros((8 + 2 * _SOURCE_PADDING,) * 2, dtype=np.float32)  # np.pad is slow here
    padded[_SOURCE_PADDING:-_SOURCE_PADDING, _SOURCE_PADDING:-_SOURCE_PADDING] = digit
    resized = Image.fromarray(padded).resize((side, side), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(resized), 0.0, 1.0)  # bicubic overshoots slightly


def _choose_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """(3,) float: the first of a few random colours far enough from ``background`` (3,).

    Falls back to the farthest candidate; the draw never looks at the digit's class.
    """
    candidates = _random_colours(rng, _COLOUR_CANDIDATES)
    distances = np.linalg.norm(candidates - background, axis=1)
    visible = np.flatnonzero(distances >= _MIN_COLOUR_DISTANCE)
    return candidates[visible[0] if len(visible) else int(np.argmax(distances))]
