import dataclasses

import dask.array
import numpy as np
import pytest
import torch

from conftest import STEPS, synthetic_schema, write_synthetic_store
from pipeline.features import upsample_and_concatenate
from pipeline.store import (
    FeatureStore,
    DamagedImageError,
    IncompleteImageError,
    StoreMismatchError,
    open_store_for_writing,
)


def _labels(count, size=16):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 3, size=(size, size)) for _ in range(count)]


def _expected_image_features(activations, size=16):
    return upsample_and_concatenate([table[None] for table in activations], size)[0].numpy()


@pytest.mark.parametrize("layout", ["native", "dense"])
def test_round_trip(tmp_path, layout):
    labels = _labels(3)
    labels[2] = None
    schema, written = write_synthetic_store(tmp_path / "store.zarr", layout, labels)
    store = FeatureStore(tmp_path / "store.zarr")
    assert store.layout == layout and store.num_images == 3 and store.feature_dim == schema.feature_dim == 24
    assert store.done_mask().tolist() == [True, True, True]
    np.testing.assert_array_equal(store.labels(0), labels[0])
    assert store.labels(2) is None
    assert store.image(1).shape == (16, 16, 3) and store.image(1)[0, 0, 0] == 1
    for index in range(3):
        expected = _expected_image_features(written[index])  # (16, 16, 24) float32
        features = store.image_features(index)
        assert features.shape == (16, 16, 24) and features.dtype == np.float16
        np.testing.assert_allclose(features, expected, atol=2e-2, rtol=1e-2)
        ys, xs = np.array([0, 5, 15, 7]), np.array([3, 15, 0, 7])
        np.testing.assert_allclose(store.pixel_features(index, ys, xs), expected[ys, xs], atol=2e-2, rtol=1e-2)


def test_native_and_dense_give_the_same_pixels(tmp_path):
    labels = _labels(2)
    write_synthetic_store(tmp_path / "native.zarr", "native", labels)
    write_synthetic_store(tmp_path / "dense.zarr", "dense", labels)
    native, dense = FeatureStore(tmp_path / "native.zarr"), FeatureStore(tmp_path / "dense.zarr")
    ys, xs = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
    for index in range(2):
        from_native = native.pixel_features(index, ys.ravel(), xs.ravel())
        from_dense = dense.pixel_features(index, ys.ravel(), xs.ravel())
        # Both are the float16 rounding of the same float32 upsampling: they agree to fp16 precision.
        np.testing.assert_allclose(from_native, from_dense, rtol=2e-3, atol=4e-3)


def test_feature_order_is_step_major(tmp_path):
    _, written = write_synthetic_store(tmp_path / "store.zarr", "native", _labels(1))
    store = FeatureStore(tmp_path / "store.zarr")
    tables = store.block_tables(0)
    assert len(tables) == len(STEPS) * 3
    # tables[k] is (step k // 3, block k % 3): compare to what was written in that order.
    for table, activation in zip(tables, written[0]):
        np.testing.assert_allclose(table.float().numpy(), activation.numpy(), atol=1e-2, rtol=1e-3)


@pytest.mark.parametrize("layout", ["native", "dense"])
def test_dask_view_is_lazy_and_complete(tmp_path, layout):
    write_synthetic_store(tmp_path / "store.zarr", layout, _labels(2))
    store = FeatureStore(tmp_path / "store.zarr")
    view = store.to_dask()
    assert isinstance(view, dask.array.Array)
    assert view.shape == (2, 16, 16, 24) and view.dtype == np.float16
    np.testing.assert_array_equal(view[1].compute(), store.image_features(1))
    assert float(view.mean().compute()) == pytest.approx(
        float(np.mean([store.image_features(i).astype(np.float64).mean() for i in range(2)])), rel=1e-3
    )


def test_resume_writes_only_unfinished_images(tmp_path):
    schema = synthetic_schema("native", 3)
    writer = open_store_for_writing(tmp_path / "store.zarr", schema)
    writer.write_image(0, np.zeros((16, 16, 3), np.uint8), None, [torch.zeros(s.channels, s.height, s.width) for _ in STEPS for s in schema.block_shapes])
    reopened = open_store_for_writing(tmp_path / "store.zarr", schema)
    assert reopened.pending_images() == [1, 2]
    store = FeatureStore(tmp_path / "store.zarr")
    with pytest.raises(IncompleteImageError, match="image_01"):
        store.pixel_features(1, np.array([0]), np.array([0]))


def test_a_store_of_other_features_is_refused(tmp_path):
    write_synthetic_store(tmp_path / "store.zarr", "native", _labels(1))
    other = dataclasses.replace(synthetic_schema("native", 1), steps=[50, 250])
    with pytest.raises(StoreMismatchError, match="steps"):
        open_store_for_writing(tmp_path / "store.zarr", other)
    replaced = open_store_for_writing(tmp_path / "store.zarr", other, replace_mismatched=True)
    assert replaced.pending_images() == [0]


def test_a_folder_that_is_not_a_store_is_never_replaced_silently(tmp_path):
    (tmp_path / "store.zarr").mkdir()
    (tmp_path / "store.zarr" / "precious.txt").write_text("keep me")
    with pytest.raises(StoreMismatchError, match="not a segcache store"):
        open_store_for_writing(tmp_path / "store.zarr", synthetic_schema("native", 1))
    assert (tmp_path / "store.zarr" / "precious.txt").read_text() == "keep me"


def test_reader_refuses_other_steps_blocks_or_model(tmp_path):
    write_synthetic_store(tmp_path / "store.zarr", "native", _labels(1))
    store = FeatureStore(tmp_path / "store.zarr")
    store.require(steps=[50, 150], blocks=[5, 8, 12], checkpoint_sha256="0" * 64)
    with pytest.raises(StoreMismatchError, match="steps"):
        store.require(steps=[50, 150, 250])
    with pytest.raises(StoreMismatchError, match="blocks"):
        store.require(blocks=[5, 6])
    with pytest.raises(StoreMismatchError, match="checkpoint"):
        store.require(checkpoint_sha256="f" * 64)


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `extract` first"):
        FeatureStore(tmp_path / "nothing.zarr")


def test_chunks_hold_one_image_each(tmp_path):
    write_synthetic_store(tmp_path / "store.zarr", "dense", _labels(2))
    store = FeatureStore(tmp_path / "store.zarr")
    assert store.group["pixels"].chunks == (1, 16, 16, 24)
    assert store.group["labels"].chunks == (1, 16, 16)
    assert store.group["pixels"].dtype == np.float16


def _chunk_files(store_path, array_name, index):
    return [path for path in (store_path / array_name / "c" / str(index)).rglob("*") if path.is_file()]


@pytest.mark.parametrize("layout", ["native", "dense"])
def test_a_corrupted_chunk_fails_loudly_and_is_named_by_verify(tmp_path, layout):
    write_synthetic_store(tmp_path / "store.zarr", layout, _labels(3))
    array_name = "block_8" if layout == "native" else "pixels"
    chunk = _chunk_files(tmp_path / "store.zarr", array_name, 1)[0]
    damaged = bytearray(chunk.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    chunk.write_bytes(bytes(damaged))
    store = FeatureStore(tmp_path / "store.zarr")
    with pytest.raises(DamagedImageError, match="image_01"):
        store.pixel_features(1, np.arange(16), np.arange(16))
    assert store.damaged_images() == ["image_01"]
    assert store.verify_image(0) and store.verify_image(2)


def test_verify_catches_a_rewrite_that_bypassed_the_writer(tmp_path):
    write_synthetic_store(tmp_path / "store.zarr", "native", _labels(2))
    import zarr

    labels = zarr.open_group(tmp_path / "store.zarr", mode="r+")["labels"]
    labels[0, 0, 0] = (labels[0, 0, 0] + 1) % 3  # a valid chunk with other content
    assert FeatureStore(tmp_path / "store.zarr").damaged_images() == ["image_00"]


def test_every_chunk_carries_a_crc(tmp_path):
    write_synthetic_store(tmp_path / "store.zarr", "native", _labels(1))
    store = FeatureStore(tmp_path / "store.zarr")
    for name in ("images", "labels", "block_5", "checksums", "done"):
        codecs = [type(codec).__name__ for codec in store.group[name].metadata.codecs]
        assert codecs[-1] == "Crc32cCodec", (name, codecs)


def test_a_store_of_another_format_version_is_refused_or_replaced(tmp_path):
    import zarr

    from pipeline.store import StoreFormatError

    write_synthetic_store(tmp_path / "store.zarr", "native", _labels(1))
    group = zarr.open_group(tmp_path / "store.zarr", mode="r+")
    group.attrs["segcache"] = {**group.attrs["segcache"], "format": 1}
    with pytest.raises(StoreFormatError, match="format 1"):
        FeatureStore(tmp_path / "store.zarr")
    with pytest.raises(StoreFormatError):
        open_store_for_writing(tmp_path / "store.zarr", synthetic_schema("native", 1))
    writer = open_store_for_writing(tmp_path / "store.zarr", synthetic_schema("native", 1), replace_mismatched=True)
    assert writer.pending_images() == [0]
