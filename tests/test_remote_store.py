"""Stores at URLs: memory:// in-process, and a real S3 protocol against a moto server on loopback."""

import pickle
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import s3fs
from click.testing import CliRunner
from moto.server import ThreadedMotoServer

from cli import main
from conftest import synthetic_schema, write_image_folder, write_synthetic_store
from pipeline.config import ExtractSettings, TrainSettings
from pipeline.data.folders import ClassInfo
from pipeline.extraction.extract import extract_features
from pipeline.heads.pixel_ensemble.training import train_on_store
from pipeline.sources.tiny_unet import make_tiny_unet
from pipeline.store.locations import is_url, store_location
from pipeline.store.reader import FeatureStore
from pipeline.store.schema import StoreMismatchError
from pipeline.store.writer import open_store_for_writing

SETTINGS = ExtractSettings(steps=[50, 250], blocks=[5, 8, 12], seed=3, size=16, batch_size=2, device="cpu")
ARRAYS = ["taps/decoder.5", "taps/decoder.8", "taps/decoder.12", "images", "labels", "checksums", "done"]
BUCKET = "segcache-test"


def _free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    """An S3-compatible server (moto) on a free loopback port with one empty bucket; stopped after."""
    port = _free_loopback_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as environment:
        # The standard AWS variables: what a user sets for a real S3-compatible store, too.
        for name, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_CONFIG_FILE": "/nonexistent/aws/config",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws/credentials",
        }.items():
            environment.setenv(name, value)
        environment.delenv("AWS_PROFILE", raising=False)
        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().mkdir(BUCKET)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    return f"s3://{BUCKET}"


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("dataset")
    make_tiny_unet(sample_size=16, seed=0).save_pretrained(root / "unet")
    return root / "unet", write_image_folder(root / "images", count=3, size=16)


def test_locations_are_paths_unless_they_are_urls(tmp_path):
    assert store_location("data/stores/train.zarr") == Path("data/stores/train.zarr")
    assert store_location(f"file://{tmp_path}/a%20b.zarr") == tmp_path / "a b.zarr"
    assert store_location("s3://bucket/stores/train.zarr") == "s3://bucket/stores/train.zarr"
    assert is_url("gs://bucket/x.zarr") and is_url("memory://x") and not is_url("file:///x") and not is_url("x")
    with pytest.raises(ValueError, match="local path"):
        store_location("file://otherhost/x.zarr")


def test_a_store_at_a_memory_url_round_trips_verifies_and_pickles(tmp_path):
    url = f"memory://{tmp_path.name}/store.zarr"
    labels = [np.zeros((16, 16), np.int64), None]
    schema, _ = write_synthetic_store(url, "native", labels)
    write_synthetic_store(tmp_path / "local.zarr", "native", labels)
    remote, local = FeatureStore(url), FeatureStore(tmp_path / "local.zarr")
    assert remote.path == url and remote.schema == schema and remote.damaged_images() == []
    np.testing.assert_array_equal(remote.image_features(0), local.image_features(0))
    assert remote.disk_bytes() > 0
    copy = pickle.loads(pickle.dumps(remote))  # how a store travels to a Dask worker
    np.testing.assert_array_equal(copy.image_features(1), local.image_features(1))
    # A damaged chunk is caught by its checksum, remote as on disk.
    writable = open_store_for_writing(url, schema)
    writable.group["taps/decoder.5"][1] = np.zeros(writable.group["taps/decoder.5"].shape[1:], np.float16)
    assert FeatureStore(url).damaged_images() == ["image_01"]


def test_a_remote_store_of_other_features_is_refused_or_replaced(tmp_path):
    url = f"memory://{tmp_path.name}/store.zarr"
    write_synthetic_store(url, "native", [None])
    other = synthetic_schema("dense", 2)
    with pytest.raises(StoreMismatchError, match="layout"):
        open_store_for_writing(url, other)
    writer = open_store_for_writing(url, other, replace_mismatched=True)
    assert writer.pending_images() == [0, 1] and FeatureStore(url).layout == "dense"


def test_s3_round_trip_extract_resume_and_train(s3_bucket, tiny_dataset, tmp_path):
    checkpoint, images = tiny_dataset
    url = f"{s3_bucket}/round-trip/train.zarr"
    summary = extract_features(checkpoint, images, url, SETTINGS, show_progress=False)
    assert summary.store_path == url and summary.images_written == 3
    extract_features(checkpoint, images, tmp_path / "local.zarr", SETTINGS, show_progress=False)
    remote, local = FeatureStore(url), FeatureStore(tmp_path / "local.zarr")
    for name in ["taps/up_blocks.1.upsamplers.0", "taps/up_blocks.2.upsamplers.0", "taps/up_blocks.4.resnets.0",
                 "images", "labels", "checksums", "done"]:
        np.testing.assert_array_equal(remote.group[name][:], local.group[name][:], err_msg=name)
    assert remote.damaged_images() == [] and remote.disk_bytes() > 0
    assert s3fs.S3FileSystem().isfile(f"{BUCKET}/round-trip/train.zarr/taps/up_blocks.4.resnets.0/c/2/0/0/0/0")
    # Resuming reads the done marks back from S3: nothing left to write.
    assert extract_features(checkpoint, images, url, SETTINGS, show_progress=False).images_written == 0
    classes = ClassInfo(names=["background", "disc", "square"], ignore_label=255)
    settings = TrainSettings(members=1, max_epochs=1, buffer_pixels=256, device="cpu")
    _, trained = train_on_store(url, tmp_path / "ensemble", settings, classes, show_progress=False)
    assert trained.training_pixels > 0 and (tmp_path / "ensemble").is_dir()


def test_cli_extracts_into_and_verifies_an_s3_store(s3_bucket, tiny_dataset):
    checkpoint, images = tiny_dataset
    url = f"{s3_bucket}/cli/store.zarr"
    runner = CliRunner()
    extracted = runner.invoke(main, [
        "--quiet", "extract", "--checkpoint", str(checkpoint), "--images", str(images), "--store", url,
        "--steps", "50", "--blocks", "5,12", "--size", "16", "--device", "cpu",
    ])
    assert extracted.exit_code == 0, extracted.output
    assert f"3 of 3 images written to {url}" in extracted.output
    verified = runner.invoke(main, ["--quiet", "inspect", "--store", url, "--verify"])
    assert verified.exit_code == 0, verified.output
    assert "all 3 finished images" in verified.output


def test_a_store_pushed_to_an_s3_dvc_remote_comes_back_intact(s3_server, tmp_path, monkeypatch):
    from dvc.cli import main as dvc

    monkeypatch.chdir(tmp_path)
    write_synthetic_store(tmp_path / "train.zarr", "native", [np.zeros((16, 16), np.int64), None])
    expected = FeatureStore(tmp_path / "train.zarr").image_features(0)
    # The commands the README gives for keeping stores in a DVC remote on S3.
    assert dvc(["init", "--no-scm", "-q"]) == 0
    assert dvc(["add", "-q", "train.zarr"]) == 0
    assert dvc(["remote", "add", "-d", "stores", f"s3://{BUCKET}/dvc-cache"]) == 0
    assert dvc(["remote", "modify", "stores", "endpointurl", s3_server]) == 0
    assert dvc(["push", "-q"]) == 0
    for local_copy in (tmp_path / "train.zarr", tmp_path / ".dvc" / "cache"):
        shutil.rmtree(local_copy)
    assert dvc(["pull", "-q"]) == 0
    store = FeatureStore(tmp_path / "train.zarr")
    assert store.damaged_images() == [] and np.array_equal(store.image_features(0), expected)
