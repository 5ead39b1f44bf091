import numpy as np
import pytest
import torch

from conftest import write_image_folder
from pipeline.config import ExtractSettings
from pipeline.data.folders import list_images, load_image
from pipeline.extraction.extract import extract_features
from pipeline.sources.checkpoints import load_backbone
from pipeline.sources.diffusion_unet import UNetSource
from pipeline.sources.tiny_unet import make_tiny_unet
from pipeline.store.bilinear import upsample_and_concatenate
from pipeline.store.reader import FeatureStore
from pipeline.store.schema import StoreMismatchError

SETTINGS = ExtractSettings(steps=[50, 250], blocks=[5, 8, 12], seed=3, size=32, batch_size=3, device="cpu")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "tiny_unet"
    make_tiny_unet(sample_size=32, seed=0).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("layout", ["native", "dense"])
def test_extracted_store_holds_the_upsampled_block_features(tmp_path, tiny_checkpoint, layout):
    images = write_image_folder(tmp_path / "images", count=4)
    settings = ExtractSettings(**{**SETTINGS.__dict__, "layout": layout})
    summary = extract_features(tiny_checkpoint, images, tmp_path / "store.zarr", settings, show_progress=False)
    assert (summary.images_total, summary.images_written) == (4, 4)
    store = FeatureStore(tmp_path / "store.zarr")
    assert store.num_images == 4 and store.schema.steps == [50, 250]
    assert store.schema.taps == ["up_blocks.1.upsamplers.0", "up_blocks.2.upsamplers.0", "up_blocks.4.resnets.0"]
    assert store.schema.source["kind"] == "diffusers" and store.schema.source["noise_seed"] == 3
    assert store.image_names == [f"img_{index:03d}" for index in range(4)]
    # Recompute image 2 by hand: same noise, same steps, taps upsampled and concatenated step-major.
    source = UNetSource(load_backbone(tiny_checkpoint), [5, 8, 12], [50, 250], 3, torch.device("cpu"))
    image = torch.from_numpy(load_image(list_images(images)[2], 32))[None]
    maps = source.feature_maps(image)
    tables = [maps[tap][:, step] for step in range(2) for tap in source.taps]  # (1, C, h, w) in feature order
    expected = upsample_and_concatenate(tables, 32)[0].numpy()  # (32, 32, D)
    assert store.feature_dim == expected.shape[-1]
    np.testing.assert_allclose(store.image_features(2), expected, atol=3e-3, rtol=3e-3)
    labels = np.load(images / "img_002.npy")
    np.testing.assert_array_equal(store.labels(2), labels)


def test_a_complete_store_is_not_rewritten_and_an_interrupted_one_resumes(tmp_path, tiny_checkpoint):
    images = write_image_folder(tmp_path / "images", count=5)
    store_path = tmp_path / "store.zarr"
    extract_features(tiny_checkpoint, images, store_path, SETTINGS, show_progress=False)
    reference = FeatureStore(store_path).image_features(4)
    # Simulate a run killed before images 3 and 4 were marked done.
    import zarr

    zarr.open_group(store_path, mode="r+")["done"][3:] = 0
    modified = {path: path.stat().st_mtime_ns for path in store_path.rglob("*") if path.is_file()}
    summary = extract_features(tiny_checkpoint, images, store_path, SETTINGS, show_progress=False)
    assert summary.images_written == 2
    np.testing.assert_array_equal(FeatureStore(store_path).image_features(4), reference)
    again = extract_features(tiny_checkpoint, images, store_path, SETTINGS, show_progress=False)
    assert again.images_written == 0
    chunk_of_image_0 = next(path for path in modified if path.relative_to(store_path).parts[:4] == ("taps", "up_blocks.1.upsamplers.0", "c", "0"))
    assert chunk_of_image_0.stat().st_mtime_ns == modified[chunk_of_image_0]


def test_a_store_of_other_code_is_rebuilt_not_resumed(tmp_path, tiny_checkpoint):
    images = write_image_folder(tmp_path / "images", count=2)
    store = tmp_path / "store.zarr"
    first = extract_features(tiny_checkpoint, images, store, SETTINGS, show_progress=False, code_sha256="a" * 64)
    same = extract_features(tiny_checkpoint, images, store, SETTINGS, show_progress=False, code_sha256="a" * 64)
    assert (first.images_written, same.images_written) == (2, 0)  # the same code resumes
    with pytest.raises(StoreMismatchError, match="code_sha256"):
        extract_features(tiny_checkpoint, images, store, SETTINGS, show_progress=False, code_sha256="b" * 64)
    rebuilt = extract_features(tiny_checkpoint, images, store, SETTINGS, replace_mismatched=True,
                               show_progress=False, code_sha256="b" * 64)
    assert rebuilt.images_written == 2 and FeatureStore(store).schema.code_sha256 == "b" * 64


def test_other_settings_on_an_existing_store_are_refused(tmp_path, tiny_checkpoint):
    images = write_image_folder(tmp_path / "images", count=2)
    extract_features(tiny_checkpoint, images, tmp_path / "store.zarr", SETTINGS, show_progress=False)
    other = ExtractSettings(**{**SETTINGS.__dict__, "blocks": [5, 8]})
    with pytest.raises(StoreMismatchError, match="tap_shapes"):
        extract_features(tiny_checkpoint, images, tmp_path / "store.zarr", other, show_progress=False)
    (images / "img_001.png").write_bytes((images / "img_000.png").read_bytes())  # an image changed
    with pytest.raises(StoreMismatchError, match="image_sha256"):
        extract_features(tiny_checkpoint, images, tmp_path / "store.zarr", SETTINGS, show_progress=False)


def test_blocks_outside_the_model_are_refused(tmp_path, tiny_checkpoint):
    images = write_image_folder(tmp_path / "images", count=1)
    settings = ExtractSettings(**{**SETTINGS.__dict__, "blocks": [5, 40]})
    with pytest.raises(ValueError, match="40"):
        extract_features(tiny_checkpoint, images, tmp_path / "store.zarr", settings, show_progress=False)
    assert not (tmp_path / "store.zarr").exists()

