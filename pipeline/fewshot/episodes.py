"""DiffewS's few-shot evaluation protocol: class folds, seeded episodes, and their images.

The protocol is HSNet's, which DiffewS evaluates with:

1. Folds. The classes an episode may ask for (every label but the background and the ignore
   label) are split into `folds` folds; fold f's test (novel) classes are the f-th, (f + folds)-th,
   (f + 2·folds)-th, … of them ("interleaved", COCO-20i: with 80 classes numbered from 1, fold 0
   tests 1, 5, 9, …, 77), its training (base) classes the rest. PASCAL-5i instead cuts the list
   into contiguous blocks ("blocks": fold 0 tests 1-5).
2. Episodes. Each draws a class of the fold, a query image holding it, and `shots` other
   images holding it as supports, from one `numpy.random.default_rng(seed)` in order, so episode
   i is the same in every run and the first n of 1,000 episodes are the 1,000-episode run's
   first n. The official count is 1,000 episodes per fold with seed 0.
3. Inputs. `load_episode` reads an episode's images and binary masks of its class at the
   evaluation size (images bilinear, label maps nearest, as `load_example` does); the query's
   pixels labeled with the ignore label are marked so that scoring (`fewshot.metrics`) leaves
   them out.

Which images hold which class is read once from the label maps (`index_classes`), so drawing
1,000 episodes reads no file.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Mapping, Sequence
from typing import Literal, NamedTuple

import numpy as np
import torch
from PIL import Image

from pipeline.data.folders import ClassInfo, ImageRecord, load_example, load_label_map, require_label_maps
from pipeline.sizes import ImageShape, as_shape

logger = logging.getLogger(__name__)

EPISODES_PER_FOLD = 1000  # the official count per fold (COCO-20i, PASCAL-5i)
EPISODE_SEED = 0  # the official seed
BACKGROUND = 0  # label of the background: never a class of an episode
FoldLayout = Literal["interleaved", "blocks"]


@dataclasses.dataclass(frozen=True)
class ClassFold:
    """One fold of a class split.

    Attributes:
        fold: f, 0-based.
        folds: how many folds the classes were split into.
        test_classes: the novel classes episodes are drawn from, ascending label indices.
        train_classes: the base classes a model may be trained on, ascending label indices.
    """

    fold: int
    folds: int
    test_classes: tuple[int, ...]
    train_classes: tuple[int, ...]


def split_classes(
    candidates: Sequence[int], folds: int, fold: int, layout: FoldLayout = "interleaved"
) -> ClassFold:
    """Splits a class list into folds and returns fold `fold` (see the module docstring).

    Args:
        candidates: the label indices an episode may ask for, in the dataset's order.
        folds: how many folds, at least 1.
        fold: which one, 0 ≤ fold < folds.
        layout: "interleaved" (COCO-20i: the f-th, (f + folds)-th, … candidates) or "blocks"
            (PASCAL-5i: the f-th contiguous block; when the count does not divide, the first
            blocks are one longer, as `numpy.array_split`).

    Raises:
        ValueError: a fold out of range, a repeated candidate, an unknown layout, or a fold
            that would have no class.
    """
    candidates = [int(label) for label in candidates]
    if folds < 1 or not 0 <= fold < folds:
        raise ValueError(f"fold must be in 0..{folds - 1} with folds ≥ 1, got fold {fold} of {folds}")
    if len(set(candidates)) != len(candidates):
        raise ValueError(f"class list repeats a class: {candidates}")
    if layout == "interleaved":
        test = candidates[fold::folds]
    elif layout == "blocks":
        test = [int(label) for label in np.array_split(np.array(candidates, dtype=np.int64), folds)[fold]]
    else:
        raise ValueError(f"layout must be 'interleaved' or 'blocks', got {layout!r}")
    if not test:
        raise ValueError(
            f"fold {fold} of {folds} has no class: only {len(candidates)} classes to split ({candidates})"
        )
    train = [label for label in candidates if label not in set(test)]
    return ClassFold(fold, folds, tuple(sorted(test)), tuple(sorted(train)))


def fold_classes(
    num_classes: int,
    folds: int,
    fold: int,
    ignore: Collection[int] = (BACKGROUND,),
    layout: FoldLayout = "interleaved",
) -> ClassFold:
    """Fold `fold` of the labels 0..num_classes-1 less those in `ignore`.

    With COCO's label maps (0 background, 1..80 the classes, `num_classes` 81), 4 folds and the
    default `ignore`, fold 0 tests 1, 5, 9, …, 77: the COCO-20i split.

    Args:
        num_classes: K, the labels of the label maps (`ClassInfo.num_classes`).
        folds: how many folds.
        fold: which one, 0-based.
        ignore: labels that are never a class of an episode: the background and, when it is
            a label below K, the ignore label.
        layout: see `split_classes`.

    Raises:
        ValueError: see `split_classes`.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    return split_classes([label for label in range(num_classes) if label not in set(ignore)], folds, fold, layout)


def dataset_fold(
    classes: ClassInfo, folds: int, fold: int, background: int | None = BACKGROUND, layout: FoldLayout = "interleaved"
) -> ClassFold:
    """`fold_classes` for a dataset's `classes.json`: its background (None: it has none) and its
    ignore label are left out. The demo's 8 labels (background and 7 face parts) in 4 folds:
    fold 0 tests skin and brow (1, 5), fold 1 hair and nose, fold 2 ear and mouth, fold 3 eye."""
    ignore = {classes.ignore_label} | ({background} if background is not None else set())
    return fold_classes(classes.num_classes, folds, fold, ignore=ignore, layout=layout)


def named_fold(classes: ClassInfo, novel: Sequence[str], background: int | None = BACKGROUND) -> ClassFold:
    """A split by name: `novel` are the test classes, every other class but the background and
    the ignore label a training class (recorded as fold 0 of 1).

    Raises:
        ValueError: a name that is not a class of `classes`, or the background.
    """
    unknown = [name for name in novel if name not in classes.names]
    if unknown:
        raise ValueError(f"novel classes {unknown} are not among the classes {classes.names}")
    test = sorted(classes.names.index(name) for name in novel)
    if background in test:
        raise ValueError(f"the background ({classes.names[background]}) cannot be a novel class")
    ignore = {classes.ignore_label, background}
    train = [label for label in range(classes.num_classes) if label not in ignore and label not in test]
    return ClassFold(0, 1, tuple(test), tuple(train))


@dataclasses.dataclass(frozen=True)
class Episode:
    """One few-shot task: segment `class_index` in the query, given it in the supports.

    Attributes:
        class_index: the label index asked for.
        query: the query image's name (`ImageRecord.name`).
        supports: the support images' names, distinct and other than the query.
    """

    class_index: int
    query: str
    supports: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ClassIndex:
    """Which images hold which class, read once from the label maps (`index_classes`).

    Attributes:
        images: class index → names of the images holding it, in the records' order.
        min_pixels: an image holds a class when at least this many of its pixels have it.
        size: (H, W) the label maps were counted at; None: each at its own size.
        image_count: how many images were read.
    """

    images: Mapping[int, tuple[str, ...]]
    min_pixels: int
    size: ImageShape | None
    image_count: int


def image_shape(record: ImageRecord) -> ImageShape:
    """(H, W) of an image, from its header (nothing decoded).

    Raises:
        ValueError: naming the file if it cannot be opened.
    """
    try:
        with Image.open(record.image_path) as image:
            width, height = image.size
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"cannot read image {record.image_path}: {error}") from None
    return height, width


def index_classes(
    records: Sequence[ImageRecord],
    classes: Sequence[int],
    min_pixels: int = 1,
    size: int | Sequence[int] | None = None,
) -> ClassIndex:
    """Reads every label map once and lists, per class, the images holding it.

    Args:
        records: the images episodes are drawn from (`list_images`), each with its label map.
        classes: the label indices to index (a fold's `test_classes`).
        min_pixels: pixels of a class an image needs to hold it; at least 1.
        size: count at this size (S or (H, W), nearest neighbour as `load_episode` resizes) so
            that a class too small to survive the resizing does not count; None: each map at its
            own size (the label maps of a folder may differ in size).

    Raises:
        ValueError: an image without its label map, a label map that does not fit its image,
            or `min_pixels` < 1.
    """
    if min_pixels < 1:
        raise ValueError(f"min_pixels must be at least 1, got {min_pixels}")
    require_label_maps(list(records), records[0].image_path.parent if records else "the records")
    shape = None if size is None else as_shape(size)
    wanted = np.array(sorted({int(label) for label in classes}), dtype=np.int64)
    holding: dict[int, list[str]] = {int(label): [] for label in wanted}
    for record in records:
        own_shape = image_shape(record)
        labels = load_label_map(record, shape or own_shape, expected_shape=own_shape)  # int64 (H, W)
        values, counts = np.unique(labels, return_counts=True)
        for label in values[np.isin(values, wanted) & (counts >= min_pixels)]:
            holding[int(label)].append(record.name)
    logger.info(
        "indexed %d label maps: %s images per class", len(records),
        {label: len(names) for label, names in holding.items()},
    )
    return ClassIndex({label: tuple(names) for label, names in holding.items()}, min_pixels, shape, len(records))


def class_label(class_index: int, names: Sequence[str] | None) -> str:
    """"3 (ear)" when the names are known, else "3": how errors and logs name a class."""
    if names is not None and 0 <= class_index < len(names):
        return f"{class_index} ({names[class_index]})"
    return str(class_index)


def make_episodes(
    records_or_index: Sequence[ImageRecord] | ClassIndex,
    classes: Sequence[int],
    shots: int,
    count: int = EPISODES_PER_FOLD,
    seed: int = EPISODE_SEED,
    names: Sequence[str] | None = None,
    class_weights: Sequence[float] | None = None,
) -> list[Episode]:
    """Draws `count` episodes of a fold (see the module docstring).

    Per episode, from one `numpy.random.default_rng(seed)`: a class uniformly among `classes`
    (or in proportion to `class_weights`), a query uniformly among the images holding it, and
    `shots` distinct supports uniformly among the others holding it.

    Args:
        records_or_index: the images (`list_images`; indexed here with at least 1 pixel per
            class at their own size) or a `ClassIndex` of them (`index_classes`, for another
            `min_pixels` or size).
        classes: the fold's classes (`ClassFold.test_classes`).
        shots: supports per episode, N ≥ 1.
        count: episodes, ≥ 1 (the official 1,000).
        seed: the generator's seed (the official 0).
        names: the dataset's class names (`ClassInfo.names`), to name classes in errors.
        class_weights: one positive weight per class (training may favour some kinds of class);
            None: uniform, the protocol.

    Returns:
        The episodes, in drawing order.

    Raises:
        ValueError: shots or count below 1, no class, a repeated class, a class that fewer
            than shots + 1 images hold (naming it and how many do), or weights that are not one
            positive number per class.
    """
    if shots < 1:
        raise ValueError(f"shots must be at least 1, got {shots}")
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    classes = tuple(int(label) for label in classes)
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be one or more distinct label indices, got {list(classes)}")
    index = records_or_index if isinstance(records_or_index, ClassIndex) else index_classes(records_or_index, classes)
    check_episode_pools(index, classes, shots, names)
    probabilities = None
    if class_weights is not None:
        weights = np.asarray(class_weights, dtype=np.float64)
        if weights.shape != (len(classes),) or not np.all(weights > 0):
            raise ValueError(f"class_weights must be {len(classes)} positive numbers, got {list(class_weights)}")
        probabilities = weights / weights.sum()
    generator = np.random.default_rng(seed)
    return [draw_episode(generator, classes, index, shots, probabilities) for _ in range(count)]


def check_episode_pools(index: ClassIndex, classes: Sequence[int], shots: int, names: Sequence[str] | None) -> None:
    """Every class must be held by a query and `shots` supports, else an episode of it is impossible.

    Raises:
        ValueError: naming the classes the index lacks, that no image holds, or too few do.
    """
    unindexed = [label for label in classes if label not in index.images]
    if unindexed:
        raise ValueError(f"the class index covers classes {sorted(index.images)}, not {unindexed}: index those classes")
    threshold = f"with at least {index.min_pixels} pixel{'s' if index.min_pixels > 1 else ''}"
    absent = [class_label(label, names) for label in classes if not index.images[label]]
    if absent:
        raise ValueError(
            f"class {', '.join(absent)} occurs in none of the {index.image_count} images ({threshold}): "
            "leave it out of the fold's classes or add images that hold it"
        )
    short = [f"class {class_label(label, names)} is held by only {len(index.images[label])}" for label in classes
             if len(index.images[label]) < shots + 1]
    if short:
        raise ValueError(
            f"a {shots}-shot episode needs {shots + 1} images holding its class (a query and {shots} "
            f"supports), but of the {index.image_count} images ({threshold}) {'; '.join(short)}"
        )


def draw_episode(generator: np.random.Generator, classes: Sequence[int], index: ClassIndex, shots: int,
                 probabilities: np.ndarray | None = None) -> Episode:
    """One episode: a class (uniformly, or with these probabilities), a query holding it, `shots`
    other distinct images holding it.

    Uses exactly the generator's next draws, so episodes drawn in turn are reproducible.
    """
    if probabilities is None:  # the protocol's draw, kept as it was so that its episodes stay the same
        class_index = classes[int(generator.integers(len(classes)))]
    else:
        class_index = classes[int(generator.choice(len(classes), p=probabilities))]
    pool = index.images[class_index]
    query_position = int(generator.integers(len(pool)))
    # Distinct positions among the len(pool) - 1 other images, stepped past the query's own.
    others = generator.choice(len(pool) - 1, size=shots, replace=False)
    supports = tuple(pool[int(position) + (position >= query_position)] for position in others)
    return Episode(class_index, pool[query_position], supports)


class EpisodeInputs(NamedTuple):
    """An episode's images and masks, as `load_episode` returns them (H×W: the evaluation size).

    Attributes:
        query_image: float32 (3, H, W) in [-1, 1].
        query_mask: bool (H, W), the query's pixels of the episode's class.
        support_images: float32 (N, 3, H, W) in [-1, 1].
        support_masks: float32 (N, H, W) in {0, 1} (for `masks.masks_to_maps`).
        query_scored: bool (H, W), the query's pixels not labeled with the ignore label (the
            pixels `FewShotScores.update` scores).
    """

    query_image: torch.Tensor
    query_mask: torch.Tensor
    support_images: torch.Tensor
    support_masks: torch.Tensor
    query_scored: torch.Tensor


def load_episode(
    episode: Episode,
    folder_records: Sequence[ImageRecord] | Mapping[str, ImageRecord],
    classes: ClassInfo,
    size: int | Sequence[int] | None,
) -> EpisodeInputs:
    """Reads an episode's query and supports with their binary masks of the episode's class.

    Images are resized bilinearly and label maps by nearest neighbour (`load_example`, which
    also checks the labels against `classes`); the supports' ignore-labeled pixels are
    background in their masks.

    Args:
        episode: the episode (`make_episodes`).
        folder_records: the folder's images (`list_images`), or them by name.
        classes: the dataset's classes (`classes.json`).
        size: the evaluation size, S (S×S, the paper's 512²) or (H, W); None keeps each image's
            own size, and then the supports must have the query's.

    Returns:
        `EpisodeInputs`: query (3, H, W), its mask and scored pixels (H, W), supports
        (N, 3, H, W) and their masks (N, H, W).

    Raises:
        ValueError: an image missing from the records or without its label map, a class that is
            the ignore label or out of range, a support of another size than the query, or a
            support holding no pixel of the class at this size.
    """
    by_name = folder_records if isinstance(folder_records, Mapping) else {record.name: record for record in folder_records}
    check_episode_class(episode, classes)
    query_image, query_labels = _load_labeled(by_name, episode.query, classes, size)
    supports = [_load_labeled(by_name, name, classes, size) for name in episode.supports]
    _check_supports(episode, supports, query_image.shape[1:], classes)
    query_mask = query_labels == episode.class_index  # bool (H, W)
    if not query_mask.any():
        # Still scored, as the official code does: any foreground predicted is a false positive.
        logger.warning("query %s holds no pixel of class %s at %s", episode.query,
                       class_label(episode.class_index, classes.names), query_mask.shape)
    support_masks = np.stack([labels == episode.class_index for _, labels in supports]).astype(np.float32)
    return EpisodeInputs(
        query_image=torch.from_numpy(query_image),
        query_mask=torch.from_numpy(query_mask),
        support_images=torch.from_numpy(np.stack([image for image, _ in supports])),  # (N, 3, H, W)
        support_masks=torch.from_numpy(support_masks),  # (N, H, W)
        query_scored=torch.from_numpy(query_labels != classes.ignore_label),
    )


def check_episode_class(episode: Episode, classes: ClassInfo) -> None:
    """Raises ValueError when the episode has no support or its class is not a class of `classes`."""
    if not episode.supports:
        raise ValueError(f"episode {episode} has no support")
    label = episode.class_index
    if label == classes.ignore_label or not 0 <= label < classes.num_classes:
        raise ValueError(
            f"episode class {label} is not a class of this dataset (0..{classes.num_classes - 1}, "
            f"ignore label {classes.ignore_label})"
        )


def _load_labeled(
    by_name: Mapping[str, ImageRecord], name: str, classes: ClassInfo, size: int | Sequence[int] | None
) -> tuple[np.ndarray, np.ndarray]:
    """An image (3, H, W) and its int64 labels (H, W) at `size` (None: its own)."""
    record = by_name.get(name)
    if record is None:
        raise ValueError(f"episode image {name!r} is not among the {len(by_name)} images given")
    if record.label_path is None:
        raise ValueError(f"episode image {record.image_path} has no label map (same-stem .npy)")
    return load_example(record, size if size is not None else image_shape(record), classes)


def _check_supports(
    episode: Episode, supports: list[tuple[np.ndarray, np.ndarray]], query_shape: tuple[int, ...], classes: ClassInfo
) -> None:
    """Supports must match the query's size and hold the class (a model given an empty support
    mask has nothing to go on: an indexing mistake, not an episode)."""
    for name, (image, labels) in zip(episode.supports, supports, strict=True):
        if image.shape[1:] != query_shape:
            raise ValueError(
                f"support {name} is {image.shape[1]}×{image.shape[2]} (H×W) but the query {episode.query} is "
                f"{query_shape[0]}×{query_shape[1]}: give load_episode a size"
            )
        if not (labels == episode.class_index).any():
            raise ValueError(
                f"support {name} holds no pixel of class {class_label(episode.class_index, classes.names)} at "
                f"{labels.shape[0]}×{labels.shape[1]}: index the images at the evaluation size "
                "(index_classes(..., size=...)) so that such images are not drawn"
            )
