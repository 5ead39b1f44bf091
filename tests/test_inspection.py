import numpy as np
import pytest

from conftest import write_synthetic_store
from pipeline.inspection import format_summary, pixel_feature_vector, resolve_image, store_summary
from pipeline.store import FeatureStore


@pytest.fixture
def store(tmp_path):
    write_synthetic_store(tmp_path / "store.zarr", "native", [np.zeros((16, 16), np.int64), None])
    return FeatureStore(tmp_path / "store.zarr")


def test_summary_describes_contents_and_size(store):
    summary = store_summary(store)
    assert summary["images"] == {"total": 2, "done": 2}
    assert summary["feature_dim"] == 24 and summary["layout"] == "native"
    assert summary["blocks"][0] == {"block": 5, "channels": 6, "height": 4, "width": 4}
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
