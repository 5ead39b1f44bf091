"""Choosing labeled pixels, then streaming their features from the store in bounded batches.

The labeled pixels are chosen first, as small index arrays. Each epoch visits them in a seeded
random order; `buffer_pixels` of them at a time are gathered from the store as one Dask graph
(one task per image), and the buffer is cut into training batches. The graph runs on threads
here, or on a Dask cluster's workers when a distributed client is given (each worker opens the
store once and reads the features where it is). Memory follows
`buffer_pixels × feature_dim` (plus the store's table cache), never the dataset size.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import logging
import uuid
from collections.abc import Iterator, Sequence

import dask
import numpy as np
import torch

from pipeline.runtime.cluster import shared_value
from pipeline.store.reader import FeatureStore

logger = logging.getLogger(__name__)

# The paper's rule: a class with fewer than 20 labeled pixels in a 256×256 image is ignored there.
PAPER_MIN_CLASS_PIXELS = 20
PAPER_IMAGE_AREA = 256 * 256


@dataclasses.dataclass(frozen=True)
class LabeledPixels:
    """The training pixels: where they are and their class. All arrays are (P,).

    Held for the whole run, so kept narrow: 10 bytes per pixel (2.6 M pixels, 40 fully
    labeled 256×256 images: 26 MB).
    """

    image_index: np.ndarray  # int32
    y: np.ndarray  # uint16
    x: np.ndarray  # uint16
    label: np.ndarray  # int16 (class index; the caller widens a buffer's labels to int64)

    def __len__(self) -> int:
        return len(self.label)

    def class_counts(self, num_classes: int) -> np.ndarray:
        return np.bincount(self.label, minlength=num_classes)

    def of_images(self, images: Sequence[int]) -> LabeledPixels:
        """The pixels of these images (store indices) only; a ValueError if none has any."""
        keep = np.isin(self.image_index, np.asarray(images))
        if not keep.any():
            raise ValueError(f"none of the images {list(images)} has a labeled pixel to train on")
        return LabeledPixels(self.image_index[keep], self.y[keep], self.x[keep], self.label[keep])


def usable_labels(labels: np.ndarray, ignore_label: int, num_classes: int, min_class_pixels: int) -> np.ndarray:
    """Applies the paper's rule: in one image, a class with fewer than `min_class_pixels`
    labeled pixels becomes the ignore label.

    Args:
        labels: int (H, W).

    Returns:
        A copy, int64 (H, W).

    Raises:
        ValueError: for labels that are neither a class index nor the ignore label.
    """
    labels = labels.astype(np.int64)
    valid = ((labels >= 0) & (labels < num_classes)) | (labels == ignore_label)
    if not valid.all():
        bad = np.unique(labels[~valid])[:10].tolist()
        raise ValueError(f"labels {bad} are neither in 0..{num_classes - 1} nor the ignore label {ignore_label}")
    counts = np.bincount(labels[labels != ignore_label], minlength=num_classes)
    rare = np.flatnonzero((counts > 0) & (counts < min_class_pixels))
    labels[np.isin(labels, rare)] = ignore_label
    return labels


def scaled_min_class_pixels(image_height: int, image_width: int, setting: int | None = None) -> int:
    """The per-image pixel count below which a class is ignored.

    Args:
        image_height, image_width: the label maps' size.
        setting: a fixed count, or None for the paper's 20 pixels at 256×256 scaled with the
            image area (rounded, at least 1: at 32×32 nothing is dropped).
    """
    if setting is not None:
        return setting
    return max(1, round(PAPER_MIN_CLASS_PIXELS * image_height * image_width / PAPER_IMAGE_AREA))


def select_labeled_pixels(
    store: FeatureStore,
    num_classes: int,
    ignore_label: int,
    min_class_pixels: int | None = None,
    class_names: Sequence[str] | None = None,
) -> LabeledPixels:
    """Every usable labeled pixel of every labeled image in the store.

    A class that `usable_labels` drops from some image is logged as a warning, naming the
    class and in how many images it was dropped; louder when it is left with no pixel at all.

    Args:
        min_class_pixels: see `scaled_min_class_pixels` (None: scaled with the image area).
        class_names: for the warnings (default: the class indices).
    """
    height, width = store.image_shape
    if max(height, width) > np.iinfo(np.uint16).max or num_classes > np.iinfo(np.int16).max:
        raise ValueError(f"{store.path}: images over 65535 pixels wide or over 32767 classes are not supported")
    threshold = scaled_min_class_pixels(height, width, min_class_pixels)
    dropped_in_images = np.zeros(num_classes, dtype=np.int64)
    labeled_images = 0
    parts = []
    for index in np.flatnonzero(store.done_mask()):
        labels = store.labels(int(index))
        if labels is None:
            continue
        try:
            usable = usable_labels(labels, ignore_label, num_classes, threshold)
        except ValueError as error:
            raise ValueError(f"{store.path}, image {store.image_names[index]}: {error}") from None
        labeled_images += 1
        dropped_in_images += _class_presence(labels, ignore_label, num_classes) & ~_class_presence(usable, ignore_label, num_classes)
        labels = usable
        ys, xs = np.nonzero(labels != ignore_label)
        parts.append(
            (np.full(len(ys), index, dtype=np.int32), ys.astype(np.uint16), xs.astype(np.uint16), labels[ys, xs].astype(np.int16))
        )
    if not parts:
        raise ValueError(f"{store.path} has no labeled pixels to train on (no image has a usable label map)")
    image_index, ys, xs, label = (np.concatenate(column) for column in zip(*parts))
    pixels = LabeledPixels(image_index, ys, xs, label)
    _warn_about_dropped_classes(dropped_in_images, pixels.class_counts(num_classes), labeled_images, threshold, class_names)
    return pixels


def _class_presence(labels: np.ndarray, ignore_label: int, num_classes: int) -> np.ndarray:
    """bool (num_classes,): which classes have at least one pixel in `labels`."""
    present = np.unique(labels[labels != ignore_label]).astype(np.int64)
    mask = np.zeros(num_classes, dtype=bool)
    mask[present[(present >= 0) & (present < num_classes)]] = True
    return mask


def _warn_about_dropped_classes(
    dropped_in_images: np.ndarray, kept_counts: np.ndarray, labeled_images: int, threshold: int, class_names
) -> None:
    for class_index in np.flatnonzero(dropped_in_images):
        name = class_names[class_index] if class_names is not None else str(class_index)
        lost = "; it has no pixel left to train on and will never be predicted" if kept_counts[class_index] == 0 else ""
        logger.warning(
            "class %r has fewer than %d labeled pixels in %d of %d labeled images and is ignored there%s "
            "(train.min_class_pixels sets the threshold)",
            name, threshold, dropped_in_images[class_index], labeled_images, lost,
        )


class PixelStream:
    """Yields shuffled (features, labels) batches of the labeled pixels, epoch after epoch.

    Args:
        store: the feature store.
        pixels: the labeled pixels to visit.
        batch_size: pixels per yielded batch.
        buffer_pixels: pixels gathered from the store at a time. A buffer is held as float16
            (buffer_pixels × D × 2 bytes), and the next one is gathered while it is consumed.
        client: a `distributed.Client` whose workers run the gathering graph; None: threads here.
    """

    def __init__(
        self, store: FeatureStore, pixels: LabeledPixels, batch_size: int, buffer_pixels: int, client=None
    ):
        self.store = store
        self.pixels = pixels
        self.batch_size = batch_size
        # Whole batches per buffer: only an epoch's last batch can be short.
        self.buffer_pixels = -(-max(buffer_pixels, batch_size) // batch_size) * batch_size
        self.client = client
        # On a cluster, every worker holds its own copy of the store (reopened there, with its own cache).
        self.store_on_workers = None if client is None else shared_value(client, store)
        self._resident: np.ndarray | None = None  # all pixels' features, when they fit in one buffer

    def epoch_order(self, rng: np.random.Generator) -> np.ndarray:
        """A visiting order of all pixels, int32 (P,) (4 bytes per pixel while an epoch runs).

        Native stores: a uniform random permutation (the paper's shuffled DataLoader). Dense
        stores: a random order of tiles, shuffled again within each buffer, so that a buffer
        reads whole chunks instead of scattered pixels.
        """
        count = len(self.pixels)
        if self.store.layout == "native":
            # The same permutation as rng.permutation(count), half the memory of int64.
            return rng.permutation(np.arange(count, dtype=np.int32))
        tile_height, tile_width = self.store.group["pixels"].chunks[1:3]
        height, width = self.store.image_shape
        tiles_per_row, tiles_per_column = width // tile_width + 1, height // tile_height + 1
        tile_key = (
            self.pixels.image_index.astype(np.int64) * (tiles_per_row * tiles_per_column)
            + (self.pixels.y // tile_height).astype(np.int64) * tiles_per_row
            + self.pixels.x // tile_width
        )
        tile_rank = rng.permutation(tile_key.max() + 1)[tile_key]
        order = np.argsort(tile_rank, kind="stable").astype(np.int32)
        del tile_key, tile_rank
        for start in range(0, count, self.buffer_pixels):
            window = order[start : start + self.buffer_pixels]
            order[start : start + self.buffer_pixels] = window[rng.permutation(len(window))]
        return order

    def gather(self, chosen: np.ndarray, descending: bool = False) -> np.ndarray:
        """Features of chosen pixels (indices into `pixels`), float16 (P, D), in the order of `chosen`.

        One Dask task per image. On threads here, each task writes its pixels' rows straight
        into the result, so the buffer exists once; on a cluster, each task returns its rows
        and they are copied in as they arrive. `descending` visits the images in reverse order:
        alternating it between buffers lets a table cache smaller than the store keep hitting
        (an LRU cache swept in the same order every time would evict each table just before it
        is needed).
        """
        features = np.empty((len(chosen), self.store.feature_dim), dtype=np.float16)
        image_of_chosen = self.pixels.image_index[chosen]
        by_image = np.argsort(image_of_chosen, kind="stable")
        images, starts = np.unique(image_of_chosen[by_image], return_index=True)
        positions = np.split(by_image, starts[1:])  # per image: rows of `features` to fill
        if descending:
            images, positions = images[::-1], positions[::-1]
        # Named keys: Dask then runs independent tasks in a fixed order of their names (with
        # random names, in random order, and the alternation would not reach the cache).
        token = uuid.uuid4().hex
        if self.client is not None:
            tasks = [
                dask.delayed(image_pixel_features)(
                    self.store_on_workers, int(image), self.pixels.y[chosen[rows]], self.pixels.x[chosen[rows]],
                    dask_key_name=f"gather-{token}-{position:06d}",
                )
                for position, (image, rows) in enumerate(zip(images, positions))
            ]
            for rows, image_features in zip(positions, dask.compute(*tasks, scheduler=self.client)):
                features[rows] = image_features
            return features

        def fill(image: int, rows: np.ndarray) -> None:
            wanted = chosen[rows]
            self.store.gather_pixel_features(image, self.pixels.y[wanted], self.pixels.x[wanted], features, rows)

        tasks = [
            dask.delayed(fill)(int(image), rows, dask_key_name=f"gather-{token}-{position:06d}")
            for position, (image, rows) in enumerate(zip(images, positions))
        ]
        dask.compute(*tasks, scheduler="threads")
        return features

    def buffers(self, rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """One epoch of (features float16 (N, D), labels int64 (N,)) buffers in visiting order.

        The next buffer is gathered in the background while the current one is consumed. When
        every labeled pixel fits in one buffer (small images, few labels), the features are
        gathered once and kept: later epochs only reorder them.
        """
        order = self.epoch_order(rng)
        if len(order) <= self.buffer_pixels:
            if self._resident is None:  # (P, D) float16, in the order of `pixels`
                self._resident = self.gather(np.arange(len(order)))
            yield self._resident[order], self.pixels.label[order].astype(np.int64)
            return
        chunks: Sequence[np.ndarray] = [
            order[start : start + self.buffer_pixels] for start in range(0, len(order), self.buffer_pixels)
        ]
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as prefetcher:
            upcoming = prefetcher.submit(self.gather, chunks[0])
            for position, chosen in enumerate(chunks):
                features = upcoming.result()
                if position + 1 < len(chunks):
                    upcoming = prefetcher.submit(self.gather, chunks[position + 1], (position + 1) % 2 == 1)
                yield features, self.pixels.label[chosen].astype(np.int64)
                del features

    def batches(self, rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of (features float32 (B, D), labels int64 (B,)) batches."""
        for features, labels in self.buffers(rng):
            for start in range(0, len(labels), self.batch_size):
                yield (
                    torch.from_numpy(features[start : start + self.batch_size]).float(),
                    torch.from_numpy(labels[start : start + self.batch_size]),
                )
            del features, labels  # release this buffer before the one after next is gathered

    def member_batches(self, rng: np.random.Generator, members: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of batches for `members` models trained together, each in its own order.

        Every buffer is read once and shuffled once per member, so the members see the same
        pixels per buffer in different orders (the fast protocol's stand-in for fully
        independent orders).

        Yields:
            features float32 (M, B, D), labels int64 (M, B).
        """
        for features, labels in self.buffers(rng):
            count = len(labels)
            orders = np.stack([rng.permutation(count) for _ in range(members)])  # (M, N)
            features_tensor, labels_tensor = torch.from_numpy(features), torch.from_numpy(labels)
            for start in range(0, count, self.batch_size):
                chosen = torch.from_numpy(orders[:, start : start + self.batch_size])  # (M, B)
                # index_select on the flattened index: ~15 % faster than indexing with (M, B).
                rows = features_tensor.index_select(0, chosen.reshape(-1)).float()  # (M·B, D)
                yield rows.reshape(*chosen.shape, -1), labels_tensor[chosen]  # (M, B, D), (M, B)
            # Release this buffer before asking for the next: otherwise three buffers (this one,
            # the next and the one being prefetched) would be alive at once.
            del features, labels, features_tensor, labels_tensor


def image_pixel_features(store: FeatureStore, image: int, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """(P, D) float16: pixels (ys, xs)'s features of one image (a task a Dask worker runs)."""
    out = np.empty((len(ys), store.feature_dim), dtype=np.float16)
    store.gather_pixel_features(image, ys, xs, out, slice(None))
    return out


def return_large_allocations_promptly(threshold_bytes: int = 1 << 20) -> bool:
    """Makes glibc serve every allocation of `threshold_bytes` or more with its own mmap.

    Streaming from a store larger than the table cache reads and frees tens of MB of tables per
    image, over and over. glibc's default raises its mmap threshold after the first such free
    (up to 32 MiB), after which those reads come from its heaps, which keep the freed memory:
    measured 0.4-0.5 GB of resident memory held beyond the buffers and cache at the paper's
    shapes (bench/results/training_memory.json). A fixed threshold gives it back at every free.
    Process-wide; a no-op (False) where the C library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_mmap_threshold = -3  # from glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, threshold_bytes))
