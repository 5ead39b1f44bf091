"""`synthesize` (DatasetDDPM's samples): labeled folder, filter, resume, refusals."""

import errno
import json

import numpy as np
import pytest

from conftest import write_image_folder
from pipeline.config import ExtractSettings, SynthesizeSettings, TrainSettings
from pipeline.data.folders import check_labels_complete, list_images, load_class_info
from pipeline.extraction.extract import extract_features
from pipeline.heads.pixel_ensemble.training import train_on_store
from pipeline.sources.tiny_unet import make_tiny_unet
from pipeline.store.schema import StoreMismatchError
from pipeline.synthetic import synthesize as synthesis
from pipeline.synthetic.synthesize import MANIFEST, synthesize_dataset

CLASSES = {"names": ["background", "disc", "square"], "ignore_label": 255}
SETTINGS = SynthesizeSettings(count=6, sampler="ddim", sampling_steps=3, filter_fraction=0.34,
                              filter_lowest_fraction=0.17, batch_size=4, seed=0, pictures=2, device="cpu", threads=1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny UNet and a 2-member ensemble trained on its features of 4 labeled images."""
    root = tmp_path_factory.mktemp("synthesize")
    make_tiny_unet(sample_size=16, seed=0).save_pretrained(root / "unet")
    make_tiny_unet(sample_size=16, seed=1).save_pretrained(root / "other-unet")
    write_image_folder(root / "images", count=4, size=16)
    (root / "images" / "classes.json").write_text(json.dumps(CLASSES))
    extract = ExtractSettings(steps=[50, 150], blocks=[5, 8], size=16, device="cpu")
    classes = load_class_info(root / "images" / "classes.json")
    extract_features(root / "unet", root / "images", root / "train.zarr", extract, classes, show_progress=False)
    train_on_store(root / "train.zarr", root / "ensemble", TrainSettings(members=2, max_epochs=2, device="cpu"),
                   show_progress=False)
    return root


@pytest.fixture(scope="module")
def synthetic(models):
    synthesize_dataset(models / "unet", models / "ensemble", models / "synthetic", SETTINGS, show_progress=False)
    return models / "synthetic"


def test_writes_a_labeled_folder_that_every_command_reads(synthetic):
    records = list_images(synthetic)
    check_labels_complete(records, synthetic)
    assert [record.name for record in records] == [f"sample_{index:06d}" for index in range(6) if (synthetic / f"sample_{index:06d}.png").is_file()]
    assert len(records) == 4 and all(record.label_path is not None for record in records)  # 2 of 6 filtered
    labels = np.load(records[0].label_path)
    assert labels.shape == (16, 16) and labels.dtype == np.int16 and set(np.unique(labels)) <= {0, 1, 2}
    assert load_class_info(synthetic / "classes.json").names == CLASSES["names"]
    manifest = json.loads((synthetic / MANIFEST).read_text())
    assert manifest["kept"] == 4 and len(manifest["samples"]) == 6
    scores = [sample["uncertainty"] for sample in manifest["samples"]]
    kept = [sample["kept"] for sample in manifest["samples"]]
    assert not kept[int(np.argmax(scores))] and not kept[int(np.argmin(scores))]  # one from each end
    assert sorted(path.name for path in (synthetic / "filtered").iterdir()) == sorted(
        f"{sample['name']}{suffix}" for sample in manifest["samples"] if not sample["kept"] for suffix in (".npy", ".png"))
    assert (synthetic / "pictures" / "samples.png").stat().st_size > 1000


def test_a_full_disk_stops_cleanly_and_a_rerun_completes_the_same_dataset(models, synthetic, tmp_path, monkeypatch):
    original = synthesis.replaced_file

    def disk_fills_at_the_image_of_sample_five(target):
        if target.name == "sample_000005.png":  # after its label map was written
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(target)

    monkeypatch.setattr(synthesis, "replaced_file", disk_fills_at_the_image_of_sample_five)
    with pytest.raises(OSError, match="disk is full writing sample sample_000005"):
        synthesize_dataset(models / "unet", models / "ensemble", tmp_path / "out", SETTINGS, show_progress=False)
    assert not (tmp_path / "out" / MANIFEST).exists() and not list((tmp_path / "out").glob(".*.tmp"))
    written = {path.stem for path in (tmp_path / "out").glob("sample_*.png")}
    assert written == {path.stem for path in (tmp_path / "out" / ".synthesis").glob("sample_*.json")} == {
        f"sample_{index:06d}" for index in range(5)}  # every image has its labels and its record
    monkeypatch.setattr(synthesis, "replaced_file", original)
    summary = synthesize_dataset(models / "unet", models / "ensemble", tmp_path / "out", SETTINGS, show_progress=False)
    assert summary.sampled_now == 2  # the second batch (samples 4, 5) again
    assert json.loads((tmp_path / "out" / MANIFEST).read_text()) == json.loads((synthetic / MANIFEST).read_text())
    for path in synthetic.glob("sample_*.npy"):
        np.testing.assert_array_equal(np.load(path), np.load(tmp_path / "out" / path.name))


def test_a_larger_count_samples_only_the_new_ones(models, synthetic, tmp_path):
    import shutil

    shutil.copytree(synthetic, tmp_path / "out")
    larger = SynthesizeSettings(**{**SETTINGS.__dict__, "count": 9})
    summary = synthesize_dataset(models / "unet", models / "ensemble", tmp_path / "out", larger, show_progress=False)
    assert summary.sampled_now == 5 and summary.samples == 9 and summary.kept == 6  # batches [4, 8) and [8, 9)
    assert len(list_images(tmp_path / "out")) == 6


def test_other_settings_are_refused_or_replaced(models, synthetic, tmp_path):
    import shutil

    shutil.copytree(synthetic, tmp_path / "out")
    other = SynthesizeSettings(**{**SETTINGS.__dict__, "seed": 1})
    with pytest.raises(FileExistsError, match="seed 0 → 1"):
        synthesize_dataset(models / "unet", models / "ensemble", tmp_path / "out", other, show_progress=False)
    summary = synthesize_dataset(models / "unet", models / "ensemble", tmp_path / "out", other, show_progress=False,
                                 replace_mismatched=True)
    assert summary.sampled_now == 6
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not empty"):
        synthesize_dataset(models / "unet", models / "ensemble", tmp_path / "busy", SETTINGS, show_progress=False)
    assert (tmp_path / "busy" / "mine.txt").read_text() == "keep"


def test_an_ensemble_of_another_checkpoint_and_a_count_of_zero_are_refused(models, tmp_path):
    with pytest.raises(StoreMismatchError, match="use the checkpoint the ensemble was trained with"):
        synthesize_dataset(models / "other-unet", models / "ensemble", tmp_path / "out", SETTINGS, show_progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="count must be at least 1"):
        SynthesizeSettings(count=0)


def test_unlabeled_samples_for_a_person_to_annotate(models, tmp_path):
    settings = SynthesizeSettings(**{**SETTINGS.__dict__, "count": 3})
    summary = synthesize_dataset(models / "unet", None, tmp_path / "out", settings, image_size=32, show_progress=False)
    records = list_images(tmp_path / "out")
    assert summary.kept == 3 and len(records) == 3 and all(record.label_path is None for record in records)
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["settings"]["labeled"] is False
    from PIL import Image

    assert Image.open(records[0].image_path).size == (32, 32)
