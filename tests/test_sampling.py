import logging

import dask
import numpy as np
import pytest
import torch

from conftest import write_synthetic_store
from pipeline.heads.pixel_ensemble.sampling import (
    PixelStream,
    return_large_allocations_promptly,
    scaled_min_class_pixels,
    select_labeled_pixels,
    usable_labels,
)
from pipeline.store.reader import FeatureStore


def test_rare_classes_per_image_become_ignored():
    labels = np.zeros((10, 10), dtype=np.uint8)
    labels[:2, :] = 1  # 20 pixels of class 1: kept
    labels[5, :5] = 2  # 5 pixels of class 2: fewer than 20, ignored
    labels[9, 9] = 255
    usable = usable_labels(labels, ignore_label=255, num_classes=3, min_class_pixels=20)
    assert (usable[:2] == 1).all()
    assert (usable[5, :5] == 255).all()
    assert usable[9, 9] == 255 and usable.dtype == np.int64


def test_ignore_label_zero_is_a_class_index_that_never_trains():
    labels = np.zeros((10, 10), dtype=np.int32)  # bedroom_28's format: int32, class 0 is the ignore label
    labels[:3, :] = 1  # 30 pixels
    labels[9, :4] = 2  # 4 pixels: rare, becomes 0 (ignored)
    usable = usable_labels(labels, ignore_label=0, num_classes=3, min_class_pixels=20)
    assert set(np.unique(usable).tolist()) == {0, 1} and (usable[:3] == 1).all() and (usable[9, :4] == 0).all()


def test_out_of_range_labels_are_refused():
    with pytest.raises(ValueError, match="neither"):
        usable_labels(np.array([[0, 7]]), ignore_label=255, num_classes=3, min_class_pixels=1)


@pytest.mark.parametrize("side, expected", [(256, 20), (512, 80), (128, 5), (64, 1), (32, 1), (16, 1)])
def test_the_rare_class_threshold_scales_with_the_image_area(side, expected):
    assert scaled_min_class_pixels(side, side) == expected  # the paper's 20 at 256×256
    assert scaled_min_class_pixels(side, side, setting=7) == 7  # a set value is used as it is


def test_a_class_dropped_from_images_is_named_in_a_warning(tmp_path, caplog):
    labels = []
    for index in range(3):
        label_map = np.zeros((16, 16), dtype=np.int64)
        label_map[0, : 3 + 30 * (index == 0)] = 1  # class 1: 16 pixels in image 0 (the whole row), 3 in the others
        label_map[5, :2] = 2  # class 2: 2 pixels in every image
        labels.append(label_map)
    write_synthetic_store(tmp_path / "store.zarr", "native", labels)
    store = FeatureStore(tmp_path / "store.zarr")
    with caplog.at_level(logging.WARNING, logger="pipeline.heads.pixel_ensemble.sampling"):
        pixels = select_labeled_pixels(store, 3, 255, min_class_pixels=10, class_names=["background", "round", "square"])
    assert pixels.class_counts(3)[1] == 16 and pixels.class_counts(3)[2] == 0
    messages = [record.getMessage() for record in caplog.records]
    assert any("'round'" in message and "2 of 3" in message and "never" not in message for message in messages)
    assert any("'square'" in message and "3 of 3" in message and "never be predicted" in message for message in messages)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.heads.pixel_ensemble.sampling"):
        pixels = select_labeled_pixels(store, 3, 255)  # scaled with the area: 1 pixel at 16×16, nothing dropped
    assert pixels.class_counts(3)[2] == 6 and not caplog.records


def _store_with_labels(tmp_path, layout):
    labels = []
    for index in range(3):
        label_map = np.full((16, 16), 255, dtype=np.int64)
        label_map[: 4 + index, :] = index % 3  # 64, 80, 96 labeled pixels of classes 0, 1, 2
        labels.append(label_map)
    labels.append(None)  # an unlabeled image is skipped
    write_synthetic_store(tmp_path / f"{layout}.zarr", layout, labels)
    return FeatureStore(tmp_path / f"{layout}.zarr"), labels


def test_select_labeled_pixels_takes_every_usable_pixel_and_no_ignored_one(tmp_path):
    store, labels = _store_with_labels(tmp_path, "native")
    pixels = select_labeled_pixels(store, num_classes=3, ignore_label=255)
    assert len(pixels) == 64 + 80 + 96
    assert set(pixels.image_index.tolist()) == {0, 1, 2}
    assert (pixels.label != 255).all()
    for image, y, x, label in zip(pixels.image_index, pixels.y, pixels.x, pixels.label):
        assert labels[image][y, x] == label


@pytest.mark.parametrize("layout", ["native", "dense"])
def test_stream_covers_every_pixel_once_per_epoch_with_correct_features(tmp_path, layout):
    store, _ = _store_with_labels(tmp_path, layout)
    pixels = select_labeled_pixels(store, num_classes=3, ignore_label=255)
    stream = PixelStream(store, pixels, batch_size=64, buffer_pixels=100)
    seen_features, seen_labels = [], []
    for features, labels in stream.batches(np.random.default_rng(0)):
        assert features.dtype == torch.float32 and features.shape[1] == store.feature_dim
        assert len(features) <= 64
        seen_features.append(features.numpy())
        seen_labels.append(labels.numpy())
    features, labels = np.concatenate(seen_features), np.concatenate(seen_labels)
    assert len(labels) == len(pixels)
    np.testing.assert_array_equal(np.sort(labels), np.sort(pixels.label))
    # Every yielded feature row is the stored feature of some pixel with that label.
    expected = {}
    for image in range(3):
        rows = pixels.image_index == image
        # Buffers hold float16: the stored feature rounded as a dense store would keep it.
        stored = store.pixel_features(image, pixels.y[rows], pixels.x[rows]).astype(np.float16).astype(np.float32)
        for vector, label in zip(stored, pixels.label[rows]):
            expected[vector.tobytes()] = label
    assert all(expected[row.tobytes()] == label for row, label in zip(features, labels))


def test_epoch_orders_differ_by_seed_and_repeat_with_it(tmp_path):
    store, _ = _store_with_labels(tmp_path, "native")
    pixels = select_labeled_pixels(store, num_classes=3, ignore_label=255)
    stream = PixelStream(store, pixels, batch_size=64, buffer_pixels=128)
    first = stream.epoch_order(np.random.default_rng(1))
    assert np.array_equal(first, stream.epoch_order(np.random.default_rng(1)))
    assert not np.array_equal(first, stream.epoch_order(np.random.default_rng(2)))
    assert np.array_equal(np.sort(first), np.arange(len(pixels)))


@pytest.mark.parametrize("layout", ["native", "dense"])
def test_per_pixel_arrays_are_narrow_and_labels_reach_training_as_int64(tmp_path, layout):
    # What is held for every labeled pixel during a run: 10 bytes, plus a 4-byte epoch order.
    store, _ = _store_with_labels(tmp_path, layout)
    pixels = select_labeled_pixels(store, num_classes=3, ignore_label=255)
    widths = [array.itemsize for array in (pixels.image_index, pixels.y, pixels.x, pixels.label)]
    assert sum(widths) == 10
    stream = PixelStream(store, pixels, batch_size=64, buffer_pixels=128)
    order = stream.epoch_order(np.random.default_rng(0))
    assert order.dtype == np.int32 and np.array_equal(np.sort(order), np.arange(len(pixels)))
    if layout == "native":  # the same order as an int64 permutation: seeds keep their meaning
        assert np.array_equal(order, np.random.default_rng(0).permutation(len(pixels)))
    _, labels = next(iter(stream.batches(np.random.default_rng(0))))
    assert labels.dtype == torch.int64


def test_return_large_allocations_promptly_is_safe_to_call():
    assert return_large_allocations_promptly() in (True, False)


def test_dense_order_keeps_each_buffer_within_few_tiles(tmp_path):
    store, _ = _store_with_labels(tmp_path, "dense")
    pixels = select_labeled_pixels(store, num_classes=3, ignore_label=255)
    stream = PixelStream(store, pixels, batch_size=8, buffer_pixels=64)
    order = stream.epoch_order(np.random.default_rng(0))
    # One 16×16 tile per image here: a 64-pixel buffer touches at most 2 images (tiles).
    for start in range(0, len(order), 64):
        assert len(set(pixels.image_index[order[start : start + 64]].tolist())) <= 2


def test_gather_memory_follows_the_buffer_not_the_dataset(tmp_path):
    store, _ = _store_with_labels(tmp_path, "native")
    pixels = select_labeled_pixels(store, num_classes=3, ignore_label=255)
    stream = PixelStream(store, pixels, batch_size=16, buffer_pixels=32)
    requested = []
    original = stream.gather
    stream.gather = lambda chosen, *rest: requested.append(len(chosen)) or original(chosen, *rest)
    sum(1 for _ in stream.batches(np.random.default_rng(0)))
    assert max(requested) == 32 and sum(requested) == len(pixels)


def test_gathering_sweeps_the_images_in_the_requested_direction(tmp_path):
    store, _ = _store_with_labels(tmp_path, "native")
    pixels = select_labeled_pixels(store, num_classes=3, ignore_label=255)
    stream = PixelStream(store, pixels, batch_size=16, buffer_pixels=60)
    visits = []
    original = store.block_tables
    store.block_tables = lambda image: visits.append(image) or original(image)
    chosen = np.arange(len(pixels))
    with dask.config.set(num_workers=1):  # one worker: the visiting order is the task order
        stream.gather(chosen)
        forward = list(visits)
        visits.clear()
        stream.gather(chosen, descending=True)
    # Whichever end Dask starts from, the two directions sweep in opposite orders.
    assert sorted(forward) == [0, 1, 2] and visits == forward[::-1]


def test_gathering_images_in_either_order_gives_the_same_buffer(tmp_path):
    store, _ = _store_with_labels(tmp_path, "native")
    pixels = select_labeled_pixels(store, num_classes=3, ignore_label=255)
    stream = PixelStream(store, pixels, batch_size=16, buffer_pixels=60)
    chosen = np.random.default_rng(0).permutation(len(pixels))[:100]
    ascending, descending = stream.gather(chosen), stream.gather(chosen, descending=True)
    assert ascending.dtype == np.float16 and ascending.shape == (100, store.feature_dim)
    np.testing.assert_array_equal(ascending, descending)


def test_member_batches_give_each_member_its_own_order_of_the_same_buffer(tmp_path):
    store, _ = _store_with_labels(tmp_path, "native")
    pixels = select_labeled_pixels(store, num_classes=3, ignore_label=255)
    stream = PixelStream(store, pixels, batch_size=16, buffer_pixels=1000)
    batches = list(stream.member_batches(np.random.default_rng(0), members=3))
    features = torch.cat([batch for batch, _ in batches], dim=1)  # (M, P, D)
    assert features.shape == (3, len(pixels), store.feature_dim) and features.dtype == torch.float32
    assert not torch.equal(features[0], features[1])
    # Each member sees every pixel once: the same rows, in another order.
    rows = [sorted(map(bytes, member.numpy())) for member in features]
    assert rows[0] == rows[1] == rows[2]


def test_pixels_that_fit_in_one_buffer_are_gathered_once_and_reordered_every_epoch(tmp_path, monkeypatch):
    write_synthetic_store(tmp_path / "store.zarr", "native", [np.zeros((16, 16), np.int64), np.ones((16, 16), np.int64)])
    store = FeatureStore(tmp_path / "store.zarr")
    pixels = select_labeled_pixels(store, 3, 255)
    kept = PixelStream(store, pixels, batch_size=64, buffer_pixels=1024)
    calls = []
    gather = PixelStream.gather
    monkeypatch.setattr(PixelStream, "gather", lambda self, *args: calls.append(len(args[0])) or gather(self, *args))
    epochs = [list(kept.batches(np.random.default_rng(epoch))) for epoch in range(3)]
    assert calls == [512]  # once, for all 512 pixels
    for epoch, batches in enumerate(epochs):  # the same batches as a stream that gathers afresh
        fresh = list(PixelStream(store, pixels, batch_size=64, buffer_pixels=1024).batches(np.random.default_rng(epoch)))
        assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(batches, fresh))
    assert not torch.equal(epochs[0][0][1], epochs[1][0][1])  # another order each epoch
