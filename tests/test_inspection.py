import re

import numpy as np
import pytest

from conftest import PROJECT_ROOT, write_synthetic_store
from pipeline.inspection import format_summary, pixel_feature_vector, resolve_image, store_summary
from pipeline.store.reader import FeatureStore


@pytest.fixture
def store(tmp_path):
    write_synthetic_store(tmp_path / "store.zarr", "native", [np.zeros((16, 16), np.int64), None])
    return FeatureStore(tmp_path / "store.zarr")


def test_summary_describes_contents_and_size(store):
    summary = store_summary(store)
    assert summary["images"] == {"total": 2, "done": 2}
    assert summary["feature_dim"] == 24 and summary["layout"] == "native"
    assert summary["taps"][0] == {"name": "decoder.5", "channels": 6, "height": 4, "width": 4}
    assert summary["disk_bytes"] > 0 and summary["disk_bytes_per_image"] == summary["disk_bytes"] / 2
    text = format_summary(summary)
    assert "2 of 2 done" in text and "5 (6×4×4)" in text


def test_pixel_vector_by_index_or_name(store):
    by_index = pixel_feature_vector(store, "1", 3, 4)
    assert by_index == pixel_feature_vector(store, "image_01", 3, 4)
    np.testing.assert_allclose(by_index, store.pixel_features(1, np.array([3]), np.array([4]))[0])
    with pytest.raises(ValueError, match="no image"):
        resolve_image(store, "7")
    with pytest.raises(ValueError, match="outside"):
        pixel_feature_vector(store, "0", 16, 0)


def test_tap_statistics_match_numpy(store):
    from pipeline.inspection import feature_groups, tap_statistics

    statistics = tap_statistics(store)
    assert [row["features"] for row in statistics][:3] == ["t50 decoder.5", "t50 decoder.8", "t50 decoder.12"]
    first = np.concatenate([store.image_features(i)[..., feature_groups(store)[0][1]].astype(np.float64).ravel() for i in range(2)])
    assert statistics[0]["mean"] == pytest.approx(first.mean()) and statistics[0]["std"] == pytest.approx(first.std())
    assert 0 <= statistics[0]["zero_fraction"] <= 1
    assert "t50 decoder.5" in format_summary({**store_summary(store), "tap_statistics": statistics})


def test_principal_components_picture_separates_two_regions():
    from pipeline.inspection import principal_components_rgb

    features = np.zeros((8, 8, 5), dtype=np.float32)
    features[:, 4:, 0] = 1.0  # the right half differs along one direction
    features += np.random.default_rng(0).normal(0, 0.01, features.shape)
    rgb = principal_components_rgb(features)
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    assert abs(int(rgb[:, :4, 0].mean()) - int(rgb[:, 4:, 0].mean())) > 150


def test_similarity_is_one_at_the_reference_pixel(store):
    from pipeline.inspection import cosine_similarity_map

    reference = store.pixel_features(0, np.array([3]), np.array([5]))[0]
    similarity = cosine_similarity_map(store, reference, 0)
    assert similarity.shape == (16, 16) and similarity[3, 5] == pytest.approx(1.0, abs=1e-3)
    assert similarity.max() <= 1.0 + 1e-5


def test_pictures_and_export(store, tmp_path):
    from PIL import Image

    from pipeline.inspection import export_pixel_features, save_pca_pictures, save_similarity_pictures

    save_pca_pictures(store, "0", tmp_path / "pca.png")
    save_similarity_pictures(store, "0", 3, 5, tmp_path / "similarity.png", ["image_01"])
    assert Image.open(tmp_path / "pca.png").size[0] > 300 and Image.open(tmp_path / "similarity.png").size[0] > 200
    features = export_pixel_features(store, "1", [(0, 0), (3, 4)], tmp_path / "pixels.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "pixels.npy"), features)
    export_pixel_features(store, "1", [(0, 0), (3, 4)], tmp_path / "pixels.csv")
    table = np.loadtxt(tmp_path / "pixels.csv", delimiter=",", skiprows=1)
    assert table.shape == (2, 26) and table[1, :2].tolist() == [3, 4]
    with pytest.raises(ValueError, match=".npy or .csv"):
        export_pixel_features(store, "1", [(0, 0)], tmp_path / "pixels.txt")


def test_readme_xarray_example_reads_the_store_without_segcache_and_without_a_warning(tmp_path):
    import warnings

    import dask.array
    import xarray
    import zarr

    from pipeline.store.reader import FeatureStore
    from pipeline.store.writer import open_store_for_writing

    path = tmp_path / "store.zarr"
    _, written = write_synthetic_store(path, "native", [np.zeros((16, 16), np.int64), None])
    with open_store_for_writing(path, FeatureStore(path).schema).claim([0, 1]):  # as concurrent extraction leaves it
        pass
    readme = (PROJECT_ROOT / "docs" / "store.md").read_text()
    code = re.search(r"<!-- xarray-example.*?-->\n```python\n(.*?)```", readme, re.DOTALL).group(1)
    code = code.replace("data/stores/ddpm-train.zarr", str(path)).replace("up_blocks.4.resnets.0", "decoder.12")
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning of zarr, xarray or Dask fails the test
        exec(code, namespace)
        assert {name for name, _ in zarr.open_group(path, mode="r").members(max_depth=None)} >= {"images", "taps", "done"}
        assert set(xarray.open_zarr(path, consolidated=False).data_vars) == {"images", "labels", "checksums", "done"}
        assert dask.array.from_zarr(str(path), component="images").shape == (2, 16, 16, 3)
    # conftest writes activations per (step, tap): decoder.12 is the last of each step's three.
    expected = np.stack([written[0][step * 3 + 2][:, 5, 7] for step in range(2)])  # (step, channel)
    np.testing.assert_allclose(namespace["pixel"], expected.astype(np.float16), rtol=1e-3)
    assert namespace["names"] == ["image_00", "image_01"]
    assert namespace["tap"].dims == ("image", "step", "decoder.12.channel", "decoder.12.y", "decoder.12.x")
