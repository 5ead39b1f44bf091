import dataclasses
import hashlib
import pickle
import shutil

import dask.array
import numpy as np
import pytest
import torch

from conftest import STEPS, as_feature_maps, synthetic_activations, synthetic_schema, write_synthetic_store
from pipeline.store.bilinear import upsample_and_concatenate
from pipeline.store.layouts import store_arrays
from pipeline.store.reader import FeatureStore
from pipeline.store.schema import DamagedImageError, IncompleteImageError, StoreMismatchError, StoreSchema
from pipeline.store.writer import open_store_for_writing


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
    writer.write_image(0, np.zeros((16, 16, 3), np.uint8), None, _zero_activations(schema))
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


def test_the_feature_description_names_source_steps_and_taps(tmp_path):
    write_synthetic_store(tmp_path / "store.zarr", "native", _labels(1))
    description = FeatureStore(tmp_path / "store.zarr").feature_description()
    assert description.taps == ["decoder.5", "decoder.8", "decoder.12"] and description.steps == [50, 150]
    assert description.source["checkpoint_sha256"] == "0" * 64 and description.feature_dim == 24
    other = dataclasses.replace(description, steps=[50], source={**description.source, "noise_seed": 1})
    assert description.differences(other) == ["source.noise_seed: 0 vs 1", "steps: [50, 150] vs [50]"]


@pytest.mark.parametrize("layout", ["native", "dense"])
def test_a_selection_of_steps_and_taps_reads_their_columns_only(tmp_path, layout):
    write_synthetic_store(tmp_path / "store.zarr", layout, _labels(2))
    full = FeatureStore(tmp_path / "store.zarr")
    chosen = FeatureStore(tmp_path / "store.zarr", steps=[150], taps=[12, "decoder.5"])  # kept in store order
    assert chosen.feature_dim == 6 + 2 and chosen.selection.taps == ["decoder.5", "decoder.12"]
    description = chosen.feature_description()
    assert (description.steps, description.taps, description.feature_dim) == ([150], ["decoder.5", "decoder.12"], 8)
    columns = np.r_[12:18, 22:24]  # step 150's group starts at 12: decoder.5 is 12..17, decoder.12 is 22..23
    ys, xs = np.array([0, 3, 15]), np.array([1, 9, 15])
    np.testing.assert_array_equal(chosen.pixel_features(1, ys, xs), full.pixel_features(1, ys, xs)[:, columns])
    np.testing.assert_array_equal(chosen.image_features(0), full.image_features(0)[..., columns])
    assert chosen.to_dask().shape == (2, 16, 16, 8)
    assert pickle.loads(pickle.dumps(chosen)).feature_dim == 8  # a Dask worker reopens the same selection
    if layout == "native":
        assert [tuple(table.shape) for table in chosen.block_tables(0)] == [(6, 4, 4), (2, 16, 16)]
    with pytest.raises(StoreMismatchError, match=r"no tap 'decoder.7'.*decoder.5 \(block 5\)"):
        FeatureStore(tmp_path / "store.zarr", taps=["decoder.7"])
    assert FeatureStore(tmp_path / "store.zarr", taps=["decoder"]).feature_dim == full.feature_dim  # every numbered tap
    with pytest.raises(StoreMismatchError, match=r"no step \[250\].*\[50, 150\]"):
        FeatureStore(tmp_path / "store.zarr", steps=[250])


def test_native_arrays_are_named_by_tap_under_taps(tmp_path):
    write_synthetic_store(tmp_path / "store.zarr", "native", _labels(1))
    group = FeatureStore(tmp_path / "store.zarr").group
    assert sorted(group["taps"].keys()) == ["decoder.12", "decoder.5", "decoder.8"]
    assert group["taps/decoder.8"].shape == (1, 2, 4, 8, 8)  # (N, T, C, h, w)
    assert group["taps/decoder.8"].metadata.dimension_names == ("image", "step", "decoder.8.channel",
                                                                "decoder.8.y", "decoder.8.x")


def test_a_store_of_format_3_is_refused_with_how_to_re_extract(tmp_path):
    import zarr

    from pipeline.store.schema import StoreFormatError

    write_synthetic_store(tmp_path / "store.zarr", "native", _labels(1))
    group = zarr.open_group(tmp_path / "store.zarr", mode="r+")
    group.attrs["segcache"] = {**group.attrs["segcache"], "format": 3}
    with pytest.raises(StoreFormatError, match=r"format 3.*Re-run extract"):
        FeatureStore(tmp_path / "store.zarr")


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
    array_name = "taps/decoder.8" if layout == "native" else "pixels"
    chunk = _chunk_files(tmp_path / "store.zarr", array_name, 1)[0]
    damaged = bytearray(chunk.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    chunk.write_bytes(bytes(damaged))
    store = FeatureStore(tmp_path / "store.zarr")
    with pytest.raises(DamagedImageError, match="image_01"):
        store.pixel_features(1, np.arange(16), np.arange(16))
    assert store.damaged_images() == ["image_01"]
    assert store.verify_image(0) and store.verify_image(2)


@pytest.mark.parametrize("array_name", ["taps/decoder.8", "labels", "images"])
def test_verify_catches_a_rewrite_that_bypassed_the_writer(tmp_path, array_name):
    write_synthetic_store(tmp_path / "store.zarr", "native", _labels(2))
    import zarr

    array = zarr.open_group(tmp_path / "store.zarr", mode="r+")[array_name]
    region = array[0]
    region.flat[0] = (region.flat[0] + 1) % 3  # one value changed
    array[0] = region  # by zarr: a valid chunk, with a CRC32C of its own, and other content
    store = FeatureStore(tmp_path / "store.zarr")
    assert store.image(0) is not None  # every read passes
    assert store.damaged_images() == ["image_00"]


@pytest.mark.parametrize("layout", ["native", "dense"])
def test_new_labels_keep_the_features_and_renew_the_checksum(tmp_path, layout):
    schema, _ = write_synthetic_store(tmp_path / "store.zarr", layout, _labels(2))
    features = FeatureStore(tmp_path / "store.zarr").image_features(1)
    writer = open_store_for_writing(tmp_path / "store.zarr", schema)
    corrected = np.full((16, 16), 2)
    assert writer.replace_labels(1, corrected) and writer.pending_images() == []
    store = FeatureStore(tmp_path / "store.zarr")
    assert np.array_equal(store.labels(1), corrected) and np.array_equal(store.image_features(1), features)
    assert store.damaged_images() == []
    assert writer.replace_labels(0, None) and FeatureStore(tmp_path / "store.zarr").labels(0) is None


def test_new_labels_never_bless_a_damaged_image(tmp_path):
    schema, _ = write_synthetic_store(tmp_path / "store.zarr", "native", _labels(2))
    import zarr

    array = zarr.open_group(tmp_path / "store.zarr", mode="r+")["taps/decoder.8"]
    region = array[1]
    region.flat[0] += 1
    array[1] = region  # rewritten by zarr, bypassing the writer
    writer = open_store_for_writing(tmp_path / "store.zarr", schema)
    assert not writer.replace_labels(1, np.zeros((16, 16), np.int64))
    assert writer.pending_images() == [1]  # extracted again, not relabeled


def test_verify_catches_a_chunk_of_another_image_copied_in(tmp_path):
    write_synthetic_store(tmp_path / "store.zarr", "native", _labels(2))
    (theirs,), (mine,) = (_chunk_files(tmp_path / "store.zarr", "taps/decoder.8", index) for index in (1, 0))
    mine.write_bytes(theirs.read_bytes())  # a whole, valid chunk: its CRC32C checks on every read
    store = FeatureStore(tmp_path / "store.zarr")
    assert store.pixel_features(0, np.arange(16), np.arange(16)).shape == (16, 24)
    assert store.damaged_images() == ["image_00"]


def test_the_checksum_is_sha256_of_the_chunks_crc32c_trailers(tmp_path):
    """Store format 5: each chunk file ends in the CRC32C of what precedes it (Zarr's crc32c codec),
    and an image's checksum is sha256 of those 4-byte trailers, feature arrays, labels, image."""
    import google_crc32c

    write_synthetic_store(tmp_path / "store.zarr", "native", _labels(2))
    store = FeatureStore(tmp_path / "store.zarr")
    assert store.format == 5
    for index in range(2):
        files = [file for name in ("taps/decoder.5", "taps/decoder.8", "taps/decoder.12", "labels", "images")
                 for file in _chunk_files(tmp_path / "store.zarr", name, index)]
        contents = [file.read_bytes() for file in files]
        assert all(google_crc32c.value(data[:-4]).to_bytes(4, "little") == data[-4:] for data in contents)
        expected = hashlib.sha256(b"".join(data[-4:] for data in contents)).digest()
        assert bytes(store.group["checksums"][index]) == expected


def _write_store(path, layout, count, codec, size=16):
    """A complete store like `write_synthetic_store`'s, with the chosen codec."""
    writer = open_store_for_writing(path, synthetic_schema(layout, count, size), codec=codec)
    for index, label_map in enumerate(_labels(count, size)):
        image = np.full((size, size, 3), index, dtype=np.uint8)
        writer.write_image(index, image, label_map, as_feature_maps(synthetic_activations(index)))
    return writer


def _files(root):
    return {path.relative_to(root): path.read_bytes() for path in root.rglob("*") if path.is_file()}


@pytest.mark.parametrize(
    ("layout", "codec", "size"),
    [("native", "blosc-lz4", 16), ("native", "zstd", 16), ("native", "none", 16), ("dense", "blosc-lz4", 48)],
)
def test_chunks_are_byte_for_byte_what_zarr_writes(tmp_path, layout, codec, size):
    """The writer encodes and writes its chunk files itself; each is the file zarr writes for the
    same values (at 48² the dense tiles at the edges are padded with the fill value, as zarr pads)."""
    import zarr

    _write_store(tmp_path / "ours.zarr", layout, 2, codec, size)
    shutil.copytree(tmp_path / "ours.zarr", tmp_path / "zarr.zarr")
    group = zarr.open_group(tmp_path / "zarr.zarr", mode="r+")
    for name in store_arrays(synthetic_schema(layout, 2, size)):
        array = group[name].with_config({"write_empty_chunks": True})
        for file in (tmp_path / "zarr.zarr" / name / "c").iterdir():
            shutil.rmtree(file) if file.is_dir() else file.unlink()
        array[:] = FeatureStore(tmp_path / "ours.zarr").group[name][:]  # every chunk written again, by zarr
    assert _files(tmp_path / "ours.zarr") == _files(tmp_path / "zarr.zarr")


@pytest.mark.parametrize("codec", ["blosc-lz4", "zstd", "none"])
def test_a_chunk_file_decodes_to_what_zarr_reads_and_a_damaged_one_to_none(tmp_path, codec):
    from pipeline.store.chunks import ChunkEncoder, chunk_keys

    _write_store(tmp_path / "store.zarr", "native", 2, codec)
    group = FeatureStore(tmp_path / "store.zarr").group
    for name in store_arrays(synthetic_schema("native", 2)):
        encoder = ChunkEncoder(group[name])
        for index in range(2):
            (key,) = chunk_keys(group[name], index)
            stored = (tmp_path / "store.zarr" / key).read_bytes()
            assert np.array_equal(encoder.decode(stored), group[name][index : index + 1]), (name, index)
            damaged = bytearray(stored)
            damaged[0] ^= 1
            assert encoder.decode(bytes(damaged)) is None
            assert encoder.decode(stored[:2]) is None  # shorter than a trailer


def test_chunks_are_written_through_the_page_cache_where_direct_io_is_refused(tmp_path, monkeypatch):
    from pipeline.store import chunks

    monkeypatch.setattr(chunks, "DIRECT_IO_MIN_BYTES", 0)  # the tiny store's chunks too, as a real one's features
    _write_store(tmp_path / "direct.zarr", "native", 2, "blosc-lz4")
    refused = []

    def refuse_direct_io(descriptor):
        refused.append(descriptor)
        return False

    monkeypatch.setattr(chunks, "_direct_io_taken", refuse_direct_io)
    _write_store(tmp_path / "buffered.zarr", "native", 2, "blosc-lz4")
    assert len(refused) == 2 * 7  # per image: 3 taps, labels, image, checksum, done mark
    assert _files(tmp_path / "buffered.zarr") == _files(tmp_path / "direct.zarr")
    assert FeatureStore(tmp_path / "buffered.zarr").damaged_images() == []


def test_a_chunk_being_written_by_another_writer_is_refused_and_a_leftover_is_removed_on_resume(tmp_path):
    from pipeline.store.chunks import partial_path

    schema = synthetic_schema("native", 1)
    writer = open_store_for_writing(tmp_path / "store.zarr", schema)
    leftover = partial_path(tmp_path / "store.zarr" / "taps/decoder.8/c/0/0/0/0/0")
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half a chunk")  # another writer's, or a killed one's
    maps = as_feature_maps(synthetic_activations(0))
    with pytest.raises(FileExistsError):
        writer._write_chunks("taps/decoder.8", 0, maps["decoder.8"].to(torch.float16).numpy())
    assert leftover.read_bytes() == b"half a chunk"  # not this writer's to delete
    writer.write_image(0, np.zeros((16, 16, 3), np.uint8), None, maps)  # holding the image: leftovers go first
    assert not list((tmp_path / "store.zarr").rglob("*.partial"))
    assert FeatureStore(tmp_path / "store.zarr").damaged_images() == []


def test_a_chunk_smaller_than_direct_io_min_bytes_goes_through_the_page_cache(tmp_path, monkeypatch):
    from pipeline.store import chunks

    directs = []
    taken = chunks._direct_io_taken
    monkeypatch.setattr(chunks, "_direct_io_taken", lambda descriptor: directs.append(descriptor) or taken(descriptor))
    monkeypatch.setattr(chunks, "DIRECT_IO_MIN_BYTES", 3 * chunks.ALIGNMENT)
    buffers = chunks.AlignedBuffers()
    for size in (10, 3 * chunks.ALIGNMENT - 5, 3 * chunks.ALIGNMENT - 4, 5 * chunks.ALIGNMENT - 2):
        payload = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
        path = tmp_path / "c" / str(size)
        chunks.write_chunk_file(path, payload, b"\x01\x02\x03\x04", buffers)
        assert path.read_bytes() == payload.tobytes() + b"\x01\x02\x03\x04"
    assert len(directs) == 2  # the files (payload and trailer) of 3 pages or more
    assert not list(tmp_path.rglob("*.partial"))


def test_staging_buffers_are_page_aligned_and_reused():
    from pipeline.store.chunks import ALIGNMENT, AlignedBuffers

    buffers = AlignedBuffers()
    with buffers.holding(10_000) as first, buffers.holding(100) as second:  # held at once: two buffers
        assert first.ctypes.data % ALIGNMENT == 0 and first.size == 3 * ALIGNMENT and second.size == ALIGNMENT
    with buffers.holding(5_000) as again:
        assert again is first  # the other one is too small
    with buffers.holding(100) as again:
        assert again is second  # the smallest that fits


def test_a_store_of_format_4_is_read_verified_and_resumed_with_its_own_checksums(tmp_path):
    """Stores written before format 5 record sha256 of each image's values: they are read and
    verified as such, and resuming one writes its remaining images' checksums the same way."""
    import zarr

    schema, labels = synthetic_schema("native", 2), _labels(2)
    open_store_for_writing(tmp_path / "store.zarr", schema)
    group = zarr.open_group(tmp_path / "store.zarr", mode="r+")
    group.attrs["segcache"] = {**group.attrs["segcache"], "format": 4}
    writer = open_store_for_writing(tmp_path / "store.zarr", schema)
    assert writer.format == 4
    for index in range(2):
        maps, image = as_feature_maps(synthetic_activations(index)), np.full((16, 16, 3), index, dtype=np.uint8)
        writer.write_image(index, image, labels[index], maps)
        values = [*(tap.to(torch.float16).numpy() for tap in maps.values()), labels[index].astype(np.int16), image]
        assert bytes(group["checksums"][index]) == hashlib.sha256(b"".join(part.tobytes() for part in values)).digest()
    store = FeatureStore(tmp_path / "store.zarr")
    assert store.format == 4 and store.damaged_images() == []
    group["labels"][1, 0, 0] = (group["labels"][1, 0, 0] + 1) % 3
    assert FeatureStore(tmp_path / "store.zarr").damaged_images() == ["image_01"]


def test_every_chunk_carries_a_crc(tmp_path):
    write_synthetic_store(tmp_path / "store.zarr", "native", _labels(1))
    store = FeatureStore(tmp_path / "store.zarr")
    for name in ("images", "labels", "taps/decoder.5", "checksums", "done"):
        codecs = [type(codec).__name__ for codec in store.group[name].metadata.codecs]
        assert codecs[-1] == "Crc32cCodec", (name, codecs)


def test_a_store_of_another_format_version_is_refused_or_replaced(tmp_path):
    import zarr

    from pipeline.store.schema import StoreFormatError

    write_synthetic_store(tmp_path / "store.zarr", "native", _labels(1))
    group = zarr.open_group(tmp_path / "store.zarr", mode="r+")
    group.attrs["segcache"] = {**group.attrs["segcache"], "format": 1}
    with pytest.raises(StoreFormatError, match="format 1"):
        FeatureStore(tmp_path / "store.zarr")
    with pytest.raises(StoreFormatError):
        open_store_for_writing(tmp_path / "store.zarr", synthetic_schema("native", 1))
    writer = open_store_for_writing(tmp_path / "store.zarr", synthetic_schema("native", 1), replace_mismatched=True)
    assert writer.pending_images() == [0]


# --- reliability: damage, hostile stores, interrupted and concurrent writers -------------------


def test_a_missing_chunk_of_a_finished_image_is_damage_not_zeros(tmp_path):
    labels = _labels(3)
    labels[1] = None  # an unlabeled image: its label chunk holds only the fill value, and is still written
    write_synthetic_store(tmp_path / "store.zarr", "native", labels)
    for chunk in _chunk_files(tmp_path / "store.zarr", "taps/decoder.12", 1):
        chunk.unlink()  # as a partial copy of the store would leave it
    store = FeatureStore(tmp_path / "store.zarr")
    with pytest.raises(DamagedImageError, match=r"image_01.*taps/decoder.12.*missing"):
        store.image_features(1)
    assert store.damaged_images() == ["image_01"]
    assert store.labels(1) is None  # the written fill-value chunk is there


def test_a_damaged_done_mark_leaves_the_image_pending_and_the_rest_readable(tmp_path):
    write_synthetic_store(tmp_path / "store.zarr", "native", _labels(3))
    (chunk,) = [path for path in (tmp_path / "store.zarr" / "done" / "c").iterdir() if path.name == "1"]
    chunk.write_bytes(chunk.read_bytes()[:-2])  # fails its CRC32C
    writer = open_store_for_writing(tmp_path / "store.zarr", synthetic_schema("native", 3))
    assert writer.pending_images() == [1]
    assert writer.pending_among([0, 1, 2]) == [1]  # the claims' own reading of the marks' files
    with writer.claim([0, 1, 2]) as claimed:
        assert claimed == [1]
    store = FeatureStore(tmp_path / "store.zarr")
    assert store.done_mask().tolist() == [True, False, True]
    with pytest.raises(DamagedImageError, match="image_01"):
        store.image_features(1)
    assert store.image_features(2).shape == (16, 16, 24)
    chunk.unlink()  # a mark never written: the fill value, not done
    assert writer.pending_among([0, 1, 2]) == [1]


def test_a_folder_that_is_not_a_store_is_never_deleted_even_when_replacing(tmp_path):
    (tmp_path / "store.zarr").mkdir()
    (tmp_path / "store.zarr" / "precious.txt").write_text("keep me")
    with pytest.raises(StoreMismatchError, match="never deleted"):
        open_store_for_writing(tmp_path / "store.zarr", synthetic_schema("native", 1), replace_mismatched=True)
    assert (tmp_path / "store.zarr" / "precious.txt").read_text() == "keep me"
    (tmp_path / "empty.zarr").mkdir()  # an empty folder is no one's data: the store is made in it
    assert open_store_for_writing(tmp_path / "empty.zarr", synthetic_schema("native", 1)).pending_images() == [0]


def test_concurrent_creation_makes_one_store_and_leaves_nothing_beside_it(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    schema = synthetic_schema("native", 2)
    with ThreadPoolExecutor(4) as pool:
        writers = list(pool.map(lambda _: open_store_for_writing(tmp_path / "store.zarr", schema), range(4)))
    assert all(writer.pending_images() == [0, 1] for writer in writers)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["store.zarr"]
    replaced = open_store_for_writing(tmp_path / "store.zarr", synthetic_schema("native", 3), replace_mismatched=True)
    assert replaced.pending_images() == [0, 1, 2]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["store.zarr"]


def _zero_activations(schema):
    return {s.name: torch.zeros(len(schema.steps), s.channels, s.height, s.width) for s in schema.tap_shapes}


def test_claims_keep_two_writers_off_the_same_image(tmp_path):
    schema = synthetic_schema("native", 3)
    first = open_store_for_writing(tmp_path / "store.zarr", schema)
    second = open_store_for_writing(tmp_path / "store.zarr", schema)  # another open file: as another process
    image = np.zeros((16, 16, 3), np.uint8)
    with first.claim([0, 1]) as mine:
        assert mine == [0, 1]
        with second.claim([0, 1, 2]) as theirs:
            assert theirs == [2]  # 0 and 1 are held
        first.write_image(0, image, None, _zero_activations(schema))
    with second.claim([0, 1]) as theirs:
        assert theirs == [1]  # 0 was finished meanwhile: never written twice
    assert sorted(path.name for path in (tmp_path / ".store.zarr.claims").iterdir()) == ["0", "1", "2"]
    assert sorted(path.name for path in (tmp_path / "store.zarr").iterdir() if not path.name.endswith(".json")) == [
        "checksums", "done", "images", "labels", "taps"]  # nothing but Zarr inside


def test_disjoint_writers_in_parallel_and_a_reader_see_only_whole_images(tmp_path):
    import multiprocessing

    schema = synthetic_schema("native", 8)
    open_store_for_writing(tmp_path / "store.zarr", schema)
    context = multiprocessing.get_context("fork")
    writers = [
        context.Process(target=_write_images, args=(tmp_path / "store.zarr", part)) for part in ([0, 2, 4, 6], [1, 3, 5, 7])
    ]
    for process in writers:
        process.start()
    store = FeatureStore(tmp_path / "store.zarr")
    seen_done = set()
    while any(process.is_alive() for process in writers) or len(seen_done) < 8:
        for index in range(8):
            if store.done_mask()[index]:
                assert store.verify_image(index), index  # done means whole, at every moment
                seen_done.add(index)
            else:
                try:
                    store.image_features(index)
                except IncompleteImageError:
                    continue
                # Finished between the two reads (a race the writers may win): then it is whole.
                assert store.done_mask()[index] and store.verify_image(index), index
        if not any(process.is_alive() for process in writers):
            break
    for process in writers:
        process.join()
        assert process.exitcode == 0
    assert store.done_mask().all() and store.damaged_images() == []
    for index in range(8):
        expected = _expected_image_features(synthetic_activations(index))  # (16, 16, 24)
        np.testing.assert_allclose(store.image_features(index), expected, atol=2e-2, rtol=1e-2)


def _write_images(path, indices):
    writer = open_store_for_writing(path, synthetic_schema("native", 8))
    for index in indices:
        with writer.claim([index]) as claimed:
            assert claimed == [index]
            writer.write_image(index, np.full((16, 16, 3), index, np.uint8), None, as_feature_maps(synthetic_activations(index)))


def _write_hostile_store(path, marker):
    """A segcache-looking store that also holds a Zarr v2 array whose chunk is a pickle that
    creates `marker` when unpickled, and a v3 array with a codec segcache never writes."""
    import json

    import zarr

    write_synthetic_store(path, "native", _labels(1))
    (path / ".zattrs").write_text(json.dumps(zarr.open_group(path, mode="r").attrs.asdict()))
    (path / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
    (path / "payload").mkdir()
    (path / "payload" / ".zarray").write_text(json.dumps({
        "zarr_format": 2, "shape": [1], "chunks": [1], "dtype": "|O", "compressor": None, "fill_value": None,
        "filters": [{"id": "pickle", "protocol": 5}], "order": "C", "dimension_separator": ".",
    }))
    (path / "payload" / "0").write_bytes(pickle.dumps(np.array([_CreatesFileWhenUnpickled(marker)], dtype=object)))


class _CreatesFileWhenUnpickled:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_store_is_never_unpickled(tmp_path):

    marker = tmp_path / "pwned.txt"
    _write_hostile_store(tmp_path / "store.zarr", marker)
    store = FeatureStore(tmp_path / "store.zarr")  # read as Zarr v3 only: the v2 side is never looked at
    assert store.verify_image(0) and store.image_features(0).shape == (16, 16, 24)
    assert not marker.exists()
    # The payload is live: unpickling the chunk, as its metadata asks a Zarr v2 reader to, runs it.
    pickle.loads((tmp_path / "store.zarr" / "payload" / "0").read_bytes())[0].close()
    assert marker.exists()


def test_arrays_with_foreign_codecs_or_dtypes_are_refused(tmp_path):
    import zarr

    from pipeline.store.schema import StoreFormatError

    write_synthetic_store(tmp_path / "store.zarr", "native", _labels(1))
    group = zarr.open_group(tmp_path / "store.zarr", mode="r+")
    del group["taps/decoder.8"]
    group.create_array("taps/decoder.8", shape=(1, 2, 4, 8, 8), chunks=(1, 2, 4, 8, 8), dtype="float16",
                       compressors=[zarr.codecs.GzipCodec()])
    with pytest.raises(StoreFormatError, match=r"decoder.8.*codec 'gzip'"):
        FeatureStore(tmp_path / "store.zarr")
    del group["taps/decoder.8"]
    group.create_array("taps/decoder.8", shape=(1, 2, 4, 8, 8), chunks=(1, 2, 4, 8, 8), dtype="float32")
    with pytest.raises(StoreFormatError, match=r"decoder.8.*dtype float32, expected float16"):
        FeatureStore(tmp_path / "store.zarr")
    with pytest.raises(StoreFormatError, match="decoder.8"):
        open_store_for_writing(tmp_path / "store.zarr", synthetic_schema("native", 1))


def test_malformed_provenance_is_a_format_error(tmp_path):
    import zarr

    from pipeline.store.schema import StoreFormatError

    write_synthetic_store(tmp_path / "store.zarr", "native", _labels(1))
    group = zarr.open_group(tmp_path / "store.zarr", mode="r+")
    group.attrs["segcache"] = {**group.attrs["segcache"], "tap_shapes": [{"block": 5, "surprise": 1}]}
    with pytest.raises(StoreFormatError, match="malformed"):
        FeatureStore(tmp_path / "store.zarr")


def test_original_sizes_are_recorded_only_where_an_image_was_resized():
    same = synthetic_schema("native", 2)
    assert "original_sizes" not in same.to_json()  # as every store before the field: the same zarr.json
    assert StoreSchema.from_json(same.to_json()) == same and same.original_shape(1) == same.image_shape
    resized = dataclasses.replace(same, original_sizes=[[16, 16], [48, 64]])
    assert StoreSchema.from_json(resized.to_json()) == resized and resized.original_shape(1) == (48, 64)
