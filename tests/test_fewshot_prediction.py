"""fewshot-predict's library side: supports checked and encoded once, each query's mask equal to
the full forward's, outputs at each image's own size, and the refusals (nothing written)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_attention_unet, write_image_folder
from pipeline.config import FewShotSettings
from pipeline.data.folders import ImageRecord, load_image
from pipeline.fewshot.masks import foreground_probabilities, masks_to_maps
from pipeline.fewshot.prediction import load_support, predict_fewshot_folder
from pipeline.fewshot.training import load_fewshot_model, train_fewshot

SETTINGS = FewShotSettings(folds=2, fold=0, episodes=2, steps=2, batch_size=1, learning_rate=1e-3, image_size=16,
                           device="cpu", threads=1)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("fewshot-predict")
    tiny_attention_unet().save_pretrained(root / "unet")
    write_image_folder(root / "images", count=4, size=32, seed=0)
    (root / "images" / "classes.json").write_text(json.dumps({"names": ["background", "disc", "square"], "ignore_label": 255}))
    train_fewshot(root / "unet", root / "images", root / "model", SETTINGS, show_progress=False)
    write_image_folder(root / "new", count=3, size=(24, 40), labeled=False, seed=5)  # other sizes, no labels
    return root


def test_every_image_is_segmented_at_its_own_size_as_the_full_forward_does(workspace, tmp_path):
    root = workspace
    supports = [(root / "images" / "img_000.png", root / "images" / "img_000.npy"),
                (root / "images" / "img_001.png", root / "images" / "img_001.npy")]
    summary = predict_fewshot_folder(root / "model", supports, root / "new", tmp_path / "out", device="cpu",
                                     show_progress=False)
    assert summary.images == 3 and summary.seconds_per_query > 0
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [image["name"] for image in written["images"]] == ["img_000", "img_001", "img_002"]
    mask = np.load(tmp_path / "out" / "img_001.npy")
    assert mask.shape == (24, 40) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1} and mask.any()
    for suffix in ("_mask.png", "_overlay.png"):
        assert Image.open(tmp_path / "out" / f"img_001{suffix}").size == (40, 24)
    assert (tmp_path / "out" / "predictions.png").stat().st_size > 5_000
    # The bank recorded once gives what the model's full forward (supports recomputed) gives.
    loaded = load_fewshot_model(root / "model")
    images, masks = zip(*(load_support(image, mask, 16) for image, mask in supports))
    query = torch.from_numpy(load_image(ImageRecord("q", root / "new" / "img_001.png", None), 16))[None]
    with torch.inference_mode():
        full = loaded.model(query, torch.stack(images)[None], masks_to_maps(torch.stack(masks), 3)[None])
    probability = foreground_probabilities(full)[0].numpy()  # (16, 16)
    resized = np.asarray(Image.fromarray(probability).resize((40, 24), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(mask, (resized > 0.25 * resized.max()).astype(np.uint8))


def test_bad_supports_are_refused_before_anything_is_written(workspace, tmp_path):
    root = workspace
    image = root / "images" / "img_000.png"
    np.save(tmp_path / "small.npy", np.ones((8, 8), dtype=np.uint8))
    np.save(tmp_path / "empty.npy", np.zeros((32, 32), dtype=np.uint8))
    tiny = np.zeros((32, 32), dtype=np.uint8)
    tiny[0, 1] = 1  # one pixel that nearest-neighbour resizing to 16² drops
    np.save(tmp_path / "tiny.npy", tiny)
    for mask, message in ((tmp_path / "small.npy", "is 8×8, its image .* 32×32"),
                          (tmp_path / "empty.npy", "has no foreground pixel"),
                          (tmp_path / "tiny.npy", "keeps no foreground pixel at the model's size 16×16"),
                          (tmp_path / "missing.png", "support file not found")):
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            predict_fewshot_folder(root / "model", [(image, mask)], root / "new", tmp_path / "out", device="cpu",
                                   show_progress=False)
    with pytest.raises(ValueError, match="at least one support"):
        predict_fewshot_folder(root / "model", [], root / "new", tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()


def test_a_png_mask_marks_the_class_where_it_is_not_zero(workspace, tmp_path):
    labels = np.load(workspace / "images" / "img_000.npy")
    Image.fromarray(((labels == 1) * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    image, mask = load_support(workspace / "images" / "img_000.png", tmp_path / "mask.png", 32)
    assert image.shape == (3, 32, 32) and mask.dtype == torch.float32
    np.testing.assert_array_equal(mask.numpy(), (labels == 1).astype(np.float32))
