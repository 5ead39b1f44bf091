import numpy as np
import pytest
import torch

from conftest import write_image_folder
from pipeline.data.folders import ClassInfo, list_images, load_image
from pipeline.extraction.pixels import extract_pixel_features
from pipeline.sources.pixels import neighbourhood_features
from pipeline.store.reader import FeatureStore


def test_neighbourhood_features_hold_each_pixels_window():
    image = torch.arange(3 * 5 * 5, dtype=torch.float32).reshape(3, 5, 5)
    features = neighbourhood_features(image, 3)  # (27, 5, 5)
    assert features.shape == (27, 5, 5)
    # Channel c's window is features[9c : 9c + 9], row-major; its centre is the pixel itself.
    for channel in range(3):
        assert torch.equal(features[9 * channel + 4], image[channel])
        assert features[9 * channel + 0, 2, 2] == image[channel, 1, 1]  # top-left neighbour
        assert features[9 * channel + 8, 4, 4] == image[channel, 4, 4]  # replicated edge
    assert torch.equal(neighbourhood_features(image, 1), image)
    with pytest.raises(ValueError, match="odd"):
        neighbourhood_features(image, 2)


def test_pixel_store_reads_like_any_store(tmp_path):
    images = write_image_folder(tmp_path / "images", count=2, size=16)
    classes = ClassInfo(names=["background", "disc", "square"], ignore_label=255)
    summary = extract_pixel_features(images, tmp_path / "pixels.zarr", 16, 3, classes, show_progress=False)
    assert summary.feature_dim == 27 and summary.images_written == 2
    store = FeatureStore(tmp_path / "pixels.zarr")
    assert store.feature_dim == 27 and store.schema.classes["names"] == classes.names
    rgb = load_image(list_images(images)[1], 16)  # (3, 16, 16)
    features = store.pixel_features(1, np.array([5]), np.array([7]))[0]
    np.testing.assert_allclose(features[[4, 13, 22]], rgb[:, 5, 7], atol=1e-3)
    np.testing.assert_array_equal(store.labels(1), np.load(images / "img_001.npy"))
