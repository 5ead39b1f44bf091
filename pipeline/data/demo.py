"""The embedded demo dataset: generated cartoon faces, segmented into their parts.

The paper's benchmarks segment the *parts of one object class* (FFHQ-34: eyes, brows, nose,
mouth, hair, ears, …), where a DDPM trained on unlabeled images of that class has learned where
the parts are. This module makes a license-free, offline task of that shape: faces of random
position, size, tilt, turn, proportions and hair style on colour gradients, with 8 classes:
background, skin, hair, ear, eye, brow, nose and mouth.

Colour never gives a class away: skin, hair, eye, brow and mouth colours are each drawn
uniformly and independently (ears share the skin's colour, the nose is the skin made lighter
or darker), and a part's colour is only redrawn when it is too close to the colour under it to
see. A segmenter has to tell the parts apart by shape and by where they sit in the face.

Faces are drawn at ``_SUPERSAMPLING`` times the resolution, the painter's way (later parts
over earlier ones), into a class map; the image is that class map's colours averaged down to
the output size (anti-aliased edges), and a pixel's label is the class at its centre.

Image ``i`` of a split depends only on ``(seed, split, i)``: growing the pool does not change
the labeled images, and the test split has its own random stream.

On disk this is the paper's dataset format::

    <out>/real/train/face_0000.png + face_0000.npy   (uint8 labels, same stem)
    <out>/real/test/...
    <out>/pool/face_0000.png                         (unlabeled, for DDPM training)
    <out>/classes.json                               {"num_classes", "ignore_label", "names", ...}
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.config import DemoSpec, check_demo_size

logger = logging.getLogger(__name__)

CLASS_NAMES: tuple[str, ...] = (
    "background", "skin", "hair", "ear", "eye", "brow", "nose", "mouth",
)
BACKGROUND, SKIN, HAIR, EAR, EYE, BROW, NOSE, MOUTH = range(len(CLASS_NAMES))
IGNORE_LABEL = 255

# Entropy words that keep the random streams of the splits apart.
_STREAM_CODES = {"pool": 1, "train": 2, "test": 3}
_SUPERSAMPLING = 4
# Below this RGB distance (colours in [0, 1], maximum √3) from the colour under it, a part's
# colour is redrawn: a part the eye cannot see cannot be labeled.
_MIN_COLOUR_DISTANCE = 0.35
_COLOUR_CANDIDATES = 16
_NOISE_STD = 3.0 / 255.0
# Face half-width as a share of the image side, and its largest tilt.
_FACE_HALF_WIDTH = (0.24, 0.34)
_MAX_TILT_DEGREES = 15.0


@dataclass(frozen=True)
class _Face:
    """Where a face sits and how it is shaped, in image pixels and face units.

    Face units: the face's half-width is 1, x to its right, y downwards, origin at its centre.
    """

    centre: tuple[float, float]  # (x, y) in pixels
    half_width: float  # pixels per face unit
    tilt: float  # radians, clockwise
    height: float  # face half-height in face units
    turn: float  # sideways shift of the inner parts (a head turning), face units
    long_hair: bool
    hairline: float  # y of the fringe's lower edge, face units


def make_face(
    rng: np.random.Generator,
    size: int,
    omit: Collection[int] = (),
    sticker_classes: int = 0,
    sticker_radius: tuple[float, float] = (2.0, 3.5),
) -> tuple[np.ndarray, np.ndarray]:
    """Draws one face on a gradient background.

    Args:
        rng: The image's random generator (all choices come from it).
        size: Side of the image in pixels (at least 16).
        omit: Parts (class indices) not drawn: what lies under them shows. Every other choice
            is the same as without (a face without ears is the same face, ears left out): the
            few-shot demo trains on faces without its novel parts (`write_faces`).
        sticker_classes: S > 0 adds 1 to 3 stickers to the face, small shapes of S kinds (class
            ``len(CLASS_NAMES) + k``: each kind one star-shaped outline, drawn at a random place,
            turn and size, in a random colour): many part-like base classes for few-shot training.
        sticker_radius: a sticker's radius in output pixels is drawn uniformly from this range
            (the default: small part-like shapes; e.g. (2, 9) on 32² also covers hair-sized ones).

    Returns:
        ``(image, labels)``: image (size, size, 3) uint8 RGB; labels (size, size) uint8 class
        indices into ``CLASS_NAMES``: the class drawn at each pixel's centre.
    """
    check_demo_size(size)
    face = _random_face(rng, size)
    fine = size * _SUPERSAMPLING
    # Pixel-centre coordinates of the fine grid, in output pixels: (fine, fine) each.
    rows, columns = (np.mgrid[0:fine, 0:fine] + 0.5) / _SUPERSAMPLING
    x, y = _to_face_units(face, columns, rows)  # (fine, fine) each

    classes = np.full((fine, fine), BACKGROUND, dtype=np.uint8)
    for label, region in _face_regions(face, x, y):
        if label not in omit:
            classes[region] = label

    background = _gradient_background(rng, fine)  # (fine, fine, 3)
    colours = _part_colours(rng, background[fine // 2, fine // 2])  # (classes, 3)
    canvas = np.where((classes == BACKGROUND)[..., None], background, colours[classes])
    if not 0 <= sticker_classes < IGNORE_LABEL - len(CLASS_NAMES):
        raise ValueError(f"sticker_classes must be in 0..{IGNORE_LABEL - len(CLASS_NAMES) - 1}, got {sticker_classes}")
    if sticker_classes:
        if not 0 < sticker_radius[0] <= sticker_radius[1] < size / 2:
            raise ValueError(f"sticker_radius must be 0 < low ≤ high < {size / 2}, got {sticker_radius}")
        for kind, region in _stickers(rng, sticker_classes, columns, rows, size, sticker_radius):
            classes[region] = len(CLASS_NAMES) + kind
            canvas[region] = _visible_colour(rng, canvas[region].mean(axis=0))
    # Average each SUPERSAMPLING² block: (fine, fine, 3) → (size, S, size, S, 3) → (size, size, 3).
    canvas = canvas.reshape(size, _SUPERSAMPLING, size, _SUPERSAMPLING, 3).mean(axis=(1, 3))
    canvas += rng.normal(0.0, _NOISE_STD, size=canvas.shape)
    image = np.clip(np.rint(canvas * 255.0), 0, 255).astype(np.uint8)
    centre = _SUPERSAMPLING // 2
    labels = classes[centre::_SUPERSAMPLING, centre::_SUPERSAMPLING].copy()  # (size, size)
    return image, labels


def write_demo_dataset(spec: DemoSpec, out_dir: Path) -> None:
    """Writes the pool, train and test splits and ``classes.json`` under ``out_dir``.

    Args:
        spec: What to generate.
        out_dir: Target folder; created if missing, refused if it already holds anything
            (stale images from a bigger earlier run would otherwise stay behind).

    Raises:
        FileExistsError: ``out_dir`` exists and is not empty.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"demo dataset folder is not empty: {out_dir}")
    splits = (
        ("pool", spec.pool_images, out_dir / "pool"),
        ("train", spec.train_images, out_dir / "real" / "train"),
        ("test", spec.test_images, out_dir / "real" / "test"),
    )
    for split, count, folder in splits:
        folder.mkdir(parents=True, exist_ok=True)
        faces = tqdm(range(count), desc=f"demo {split}", unit="face", disable=split != "pool")
        for index in faces:
            image, labels = make_face(stream_rng(spec.seed, split, index), spec.size)
            Image.fromarray(image).save(folder / f"face_{index:04d}.png")
            if split != "pool":
                np.save(folder / f"face_{index:04d}.npy", labels)
        logger.info("wrote %d %s faces to %s", count, split, folder)
    classes = {
        "num_classes": len(CLASS_NAMES),
        "ignore_label": IGNORE_LABEL,
        "train": spec.train_images,
        "test": spec.test_images,
        "names": list(CLASS_NAMES),
    }
    (out_dir / "classes.json").write_text(json.dumps(classes, indent=1) + "\n")


def write_faces(out_dir: Path, count: int, size: int, seed: int, omit: Collection[int] = (),
                sticker_classes: int = 0, sticker_radius: tuple[float, float] = (2.0, 3.5)) -> None:
    """Writes `count` labeled faces (`face_NNNN.png` + `.npy`) and `classes.json` into `out_dir`,
    from the stream (seed, "train"), without the `omit` parts: the few-shot demo's training
    faces, where the novel parts appear in no image (its evaluation faces hold them).

    Raises:
        FileExistsError: `out_dir` exists and is not empty.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"faces folder is not empty: {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for index in tqdm(range(count), desc="faces", unit="face", disable=count < 500):
        image, labels = make_face(stream_rng(seed, "train", index), size, omit, sticker_classes, sticker_radius)
        Image.fromarray(image).save(out_dir / f"face_{index:04d}.png")
        np.save(out_dir / f"face_{index:04d}.npy", labels)
    names = list(CLASS_NAMES) + [f"sticker_{kind}" for kind in range(sticker_classes)]
    classes = {"num_classes": len(names), "ignore_label": IGNORE_LABEL, "names": names,
               "omitted": [CLASS_NAMES[label] for label in sorted(omit)]}
    (out_dir / "classes.json").write_text(json.dumps(classes, indent=1) + "\n")


def stream_rng(seed: int, split: str, index: int = 0) -> np.random.Generator:
    """The random generator of image ``index`` of ``split``: depends only on these three."""
    return np.random.default_rng([seed, _STREAM_CODES[split], index])


def _random_face(rng: np.random.Generator, size: int) -> _Face:
    half_width = rng.uniform(*_FACE_HALF_WIDTH) * size
    height = rng.uniform(1.15, 1.4)
    # Keep the face (and most of its hair) inside the image.
    margin_x, margin_y = 1.1 * half_width, 1.1 * height * half_width
    centre = (
        rng.uniform(margin_x, max(margin_x, size - margin_x)),
        rng.uniform(margin_y, max(margin_y, size - margin_y)),
    )
    return _Face(
        centre=centre,
        half_width=half_width,
        tilt=np.deg2rad(rng.uniform(-_MAX_TILT_DEGREES, _MAX_TILT_DEGREES)),
        height=height,
        turn=rng.uniform(-0.15, 0.15),
        long_hair=bool(rng.random() < 0.5),
        hairline=rng.uniform(-0.85, -0.45) * height,
    )


def _to_face_units(face: _Face, columns: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Image coordinates (pixels) → face units (rotated by the face's tilt)."""
    dx = (columns - face.centre[0]) / face.half_width
    dy = (rows - face.centre[1]) / face.half_width
    cos, sin = np.cos(face.tilt), np.sin(face.tilt)
    return cos * dx + sin * dy, -sin * dx + cos * dy


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0


def _face_regions(face: _Face, x: np.ndarray, y: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """The parts as (class, boolean mask) pairs, in painting order (later ones on top)."""
    h, turn = face.height, face.turn
    skull = _ellipse(x, y, 0.0, -0.1 * h, 1.15, 1.05 * h)
    back_hair = skull & (y < -0.2 * h)
    if face.long_hair:  # falls behind the face down to the jaw
        back_hair |= _ellipse(x, y, 0.0, 0.1 * h, 1.25, 1.05 * h) & (y < 0.75 * h)
    head = _ellipse(x, y, 0.0, 0.0, 1.0, h)
    eye_y, eye_x = -0.05 * h, 0.42
    regions = [
        (HAIR, back_hair),
        (EAR, _ellipse(np.abs(x), y, 1.0, 0.05 * h, 0.2, 0.3)),
        (SKIN, head),
        (HAIR, head & (y < face.hairline)),  # the fringe
        (EYE, _ellipse(np.abs(x - turn), y, eye_x, eye_y, 0.2, 0.13)),
        (BROW, (np.abs(np.abs(x - turn) - eye_x) < 0.24) & (np.abs(y - (eye_y - 0.3)) < 0.07)),
        (NOSE, _nose(x - turn * 1.2, y, h)),
        (MOUTH, _ellipse(x, y, turn, 0.55 * h, 0.34, 0.12)),
    ]
    return regions


def _stickers(rng: np.random.Generator, kinds: int, columns: np.ndarray, rows: np.ndarray,
              size: int, radius_range: tuple[float, float]) -> list[tuple[int, np.ndarray]]:
    """1 to 3 stickers as (kind, boolean mask on the fine grid). Kind k's outline is fixed (from
    its own generator): radius 1 + a·cos(m·θ + φ) with m in 0..4 lobes, an aspect ratio; each
    sticker places it anywhere with its own turn and a radius drawn from `radius_range` (output
    pixels)."""
    stickers = []
    for _ in range(int(rng.integers(1, 4))):
        kind = int(rng.integers(kinds))
        shape = np.random.default_rng([kind, 7])
        lobes, depth = int(shape.integers(0, 5)), shape.uniform(0.2, 0.5)
        phase, aspect = shape.uniform(0, 2 * np.pi), shape.uniform(0.5, 1.0)
        radius, turn = rng.uniform(*radius_range), rng.uniform(0, 2 * np.pi)
        centre = rng.uniform(radius, size - radius, size=2)
        dx, dy = (columns - centre[0]) / radius, (rows - centre[1]) / radius
        u = np.cos(turn) * dx + np.sin(turn) * dy
        v = (-np.sin(turn) * dx + np.cos(turn) * dy) / aspect
        outline = 1.0 + (depth * np.cos(lobes * np.arctan2(v, u) + phase) if lobes else 0.0)
        stickers.append((kind, np.hypot(u, v) <= outline / (1.0 + depth)))
    return stickers


def _nose(x: np.ndarray, y: np.ndarray, h: float) -> np.ndarray:
    """A triangle pointing up: apex between the eyes, base above the mouth."""
    top, bottom = 0.0, 0.32 * h
    within = (y >= top) & (y <= bottom)
    half_base = 0.17 * (y - top) / (bottom - top)
    return within & (np.abs(x) <= half_base + 0.03)


def _random_colours(rng: np.random.Generator, count: int) -> np.ndarray:
    """(count, 3) float RGB in [0, 1]: the one distribution of every drawn colour."""
    return rng.uniform(0.0, 1.0, size=(count, 3))


def _visible_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """(3,): the first of a few random colours far enough from ``under`` (3,) to see.

    Falls back to the farthest candidate; the draw never looks at the part's class.
    """
    candidates = _random_colours(rng, _COLOUR_CANDIDATES)
    distances = np.linalg.norm(candidates - under, axis=1)
    visible = np.flatnonzero(distances >= _MIN_COLOUR_DISTANCE)
    return candidates[visible[0] if len(visible) else int(np.argmax(distances))]


def _part_colours(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """(len(CLASS_NAMES), 3) float RGB: each class's colour in this face (background unused)."""
    colours = np.zeros((len(CLASS_NAMES), 3))
    colours[SKIN] = _visible_colour(rng, background)
    colours[HAIR] = _visible_colour(rng, colours[SKIN])
    colours[EAR] = colours[SKIN]
    for part in (EYE, BROW, MOUTH):
        colours[part] = _visible_colour(rng, colours[SKIN])
    shift = rng.uniform(0.15, 0.3) * rng.choice([-1.0, 1.0])
    nose = colours[SKIN] + shift
    if nose.min() < 0.0 or nose.max() > 1.0:  # no room that way: shift the other way
        nose = colours[SKIN] - shift
    colours[NOSE] = np.clip(nose, 0.0, 1.0)
    return colours


def _gradient_background(rng: np.random.Generator, side: int) -> np.ndarray:
    """(side, side, 3) float: a linear blend of two random colours along a random direction."""
    start, end = _random_colours(rng, 2)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    rows, columns = np.mgrid[0:side, 0:side] / (side - 1)
    position = rows * np.sin(angle) + columns * np.cos(angle)
    position = (position - position.min()) / (position.max() - position.min())
    return start + position[..., None] * (end - start)
