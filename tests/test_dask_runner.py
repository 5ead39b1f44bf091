"""Extraction and training on a real Dask cluster: 2 worker processes of 1 thread, a tiny UNet, 16×16 images."""

import dataclasses
import os

import dask.config
import distributed
import numpy as np
import pytest
import torch

from conftest import write_image_folder, write_learnable_store
from pipeline.config import ExtractSettings, TrainSettings
from pipeline.extraction.extract import extract_features
from pipeline.heads.pixel_ensemble.sampling import PixelStream, select_labeled_pixels
from pipeline.heads.pixel_ensemble.training import train_on_store
from pipeline.runtime.cluster import shared_value
from pipeline.sources.tiny_unet import make_tiny_unet
from pipeline.store.reader import FeatureStore

SETTINGS = ExtractSettings(steps=[50, 250], blocks=[5, 8, 12], seed=3, size=16, batch_size=2, device="cpu")
ARRAYS = ["taps/up_blocks.1.upsamplers.0", "taps/up_blocks.2.upsamplers.0", "taps/up_blocks.4.resnets.0", "images",
          "labels", "checksums", "done"]


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as local_cluster, distributed.Client(local_cluster) as client:
        yield local_cluster.scheduler_address, client


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A tiny UNet, 6 labeled images and their store extracted in this process (the reference)."""
    root = tmp_path_factory.mktemp("dataset")
    make_tiny_unet(sample_size=16, seed=0).save_pretrained(root / "unet")
    images = write_image_folder(root / "images", count=6, size=16)
    extract_features(root / "unet", images, root / "in_process.zarr", SETTINGS, show_progress=False)
    return root / "unet", images, FeatureStore(root / "in_process.zarr")


def assert_same_store(store, reference):
    for name in ARRAYS:
        np.testing.assert_array_equal(store.group[name][:], reference.group[name][:], err_msg=name)
    assert store.schema == reference.schema and store.damaged_images() == []


class CountModelLoads(distributed.WorkerPlugin):
    """Counts, per worker, how often the extraction model is loaded."""

    def setup(self, worker):
        import pipeline.sources.loading

        self.loads = 0
        self.original = pipeline.sources.loading.load_source

        def counting_load(*args, **kwargs):
            self.loads += 1
            return self.original(*args, **kwargs)

        pipeline.sources.loading.load_source = counting_load

    def teardown(self, worker):
        import pipeline.sources.loading

        pipeline.sources.loading.load_source = self.original


class MisbehaveOnce(distributed.WorkerPlugin):
    """Makes the first write of image `index` on any worker misbehave (`misbehave`), once:
    a marker file created atomically tells the later attempts that it already happened."""

    def __init__(self, index, marker):
        self.index, self.marker = index, str(marker)

    def misbehave(self, writer, image_index):
        raise NotImplementedError

    def setup(self, worker):
        from pipeline.store.writer import FeatureStoreWriter

        self.original = FeatureStoreWriter.write_image
        plugin, original = self, self.original

        def write_image_or_misbehave(writer, image_index, *args, **kwargs):
            if image_index == plugin.index:
                try:
                    os.close(os.open(plugin.marker, os.O_CREAT | os.O_EXCL))
                except FileExistsError:
                    pass
                else:
                    plugin.misbehave(writer, image_index)
            return original(writer, image_index, *args, **kwargs)

        FeatureStoreWriter.write_image = write_image_or_misbehave

    def teardown(self, worker):
        from pipeline.store.writer import FeatureStoreWriter

        FeatureStoreWriter.write_image = self.original


class KillWorkerOnce(MisbehaveOnce):
    """Kills the worker process while it writes image `index`: the image's first feature array
    is overwritten with garbage and its done mark is never set, as when a machine dies mid-write."""

    def misbehave(self, writer, image_index):
        first_array = f"taps/{writer.schema.taps[0]}"
        writer.group[first_array][image_index] = np.full(writer.group[first_array].shape[1:], 7.0)
        os._exit(1)


class FailWriteOnce(MisbehaveOnce):
    """Makes the first write of image `index` raise, as a transient storage error."""

    def misbehave(self, writer, image_index):
        raise OSError("simulated: the object store is briefly unreachable")


@pytest.mark.slow
def test_cluster_extraction_equals_in_process_and_loads_the_model_once_per_worker(cluster, dataset, tmp_path):
    address, client = cluster
    checkpoint, images, reference = dataset
    client.register_plugin(CountModelLoads(), name="count-model-loads")
    try:
        settings = dataclasses.replace(SETTINGS, scheduler=address)
        summary = extract_features(checkpoint, images, tmp_path / "cluster.zarr", settings, show_progress=False)
        loads = client.run(lambda dask_worker: dask_worker.plugins["count-model-loads"].loads)
    finally:
        client.unregister_worker_plugin("count-model-loads")
    assert (summary.images_total, summary.images_written) == (6, 6) and "2 workers" in summary.device
    assert_same_store(FeatureStore(tmp_path / "cluster.zarr"), reference)
    # 5 tasks (the size multiple, the model description, 3 batches of 2), but at most one model load per worker.
    assert 1 <= sum(loads.values()) <= 2 and max(loads.values()) == 1
    # The model is released on the workers after the run.
    plugins = client.run(lambda dask_worker: [name for name in dask_worker.plugins if name.startswith("segcache")])
    assert all(names == [] for names in plugins.values())


def test_a_rectangular_store_on_the_cluster_equals_the_one_made_here(cluster, dataset, tmp_path):
    address, _ = cluster
    checkpoint, images, _ = dataset
    settings = dataclasses.replace(SETTINGS, size=[16, 32])  # 16 rows, 32 columns
    extract_features(checkpoint, images, tmp_path / "here.zarr", settings, show_progress=False)
    extract_features(checkpoint, images, tmp_path / "cluster.zarr", dataclasses.replace(settings, scheduler=address),
                     show_progress=False)
    here = FeatureStore(tmp_path / "here.zarr")
    assert here.image_shape == (16, 32) and here.group["images"].shape == (6, 16, 32, 3)
    assert_same_store(FeatureStore(tmp_path / "cluster.zarr"), here)


def test_workers_declaring_a_gpu_take_every_batch(cluster, dataset, tmp_path):
    address, client = cluster
    checkpoint, images, reference = dataset
    gpu_worker = sorted(client.scheduler_info(n_workers=-1)["workers"])[0]

    async def declare_gpus(dask_worker, count):
        await dask_worker.set_resources(GPU=count)

    client.run(declare_gpus, count=1, workers=[gpu_worker])  # as `dask worker --resources GPU=1`
    try:
        with distributed.get_task_stream(client) as task_stream:
            settings = dataclasses.replace(SETTINGS, scheduler=address)
            summary = extract_features(checkpoint, images, tmp_path / "cluster.zarr", settings, show_progress=False)
    finally:
        client.run(declare_gpus, count=0, workers=[gpu_worker])
    assert "1 with GPUs" in summary.device
    ran_on = {task["worker"] for task in task_stream.data if "extract_batch" in str(task["key"])}
    assert ran_on == {gpu_worker}
    assert_same_store(FeatureStore(tmp_path / "cluster.zarr"), reference)


def test_a_task_that_raises_is_retried(cluster, dataset, tmp_path):
    address, client = cluster
    checkpoint, images, reference = dataset
    marker = tmp_path / "failed"
    client.register_plugin(FailWriteOnce(index=4, marker=marker), name="fail-write-once")
    try:
        settings = dataclasses.replace(SETTINGS, scheduler=address)
        extract_features(checkpoint, images, tmp_path / "cluster.zarr", settings, show_progress=False)
    finally:
        client.unregister_worker_plugin("fail-write-once")
    assert marker.exists(), "no write failed"
    assert_same_store(FeatureStore(tmp_path / "cluster.zarr"), reference)


def test_a_worker_killed_mid_run_is_replaced_and_the_store_verifies(cluster, dataset, tmp_path):
    address, client = cluster
    checkpoint, images, reference = dataset
    marker = tmp_path / "killed"
    client.register_plugin(KillWorkerOnce(index=3, marker=marker), name="kill-worker-once")
    try:
        settings = dataclasses.replace(SETTINGS, scheduler=address)
        summary = extract_features(checkpoint, images, tmp_path / "cluster.zarr", settings, show_progress=False)
    finally:
        client.unregister_worker_plugin("kill-worker-once")
    assert marker.exists(), "no worker was killed"
    assert summary.images_written == 6
    store = FeatureStore(tmp_path / "cluster.zarr")
    assert store.done_mask().all()
    assert_same_store(store, reference)


def test_what_every_batch_needs_survives_the_death_of_the_worker_holding_it(cluster):
    """The store schema (and the store, for training) reach the workers as a task's result: the
    cluster keeps one copy, and when its worker dies the scheduler recomputes it (scattered data
    would be lost for good, and every batch cancelled with it: seen once as "already forgotten"
    in the killed-worker test)."""
    _, client = cluster
    schema = shared_value(client, {"names": ["a", "b"]})
    assert schema.result() == {"names": ["a", "b"]}
    (holder,) = client.who_has(schema)[schema.key]
    # The only copy goes with it. A new worker process imports torch and diffusers: on a loaded
    # 2-core machine that once took over the default 120 s.
    client.restart_workers([holder], timeout=600)
    assert schema.result(timeout=300) == {"names": ["a", "b"]}


def test_features_gathered_on_the_cluster_equal_those_read_here(cluster, tmp_path):
    address, client = cluster
    write_learnable_store(tmp_path / "train.zarr")
    store = FeatureStore(tmp_path / "train.zarr")
    pixels = select_labeled_pixels(store, num_classes=3, ignore_label=255)
    chosen = np.random.default_rng(0).permutation(len(pixels))[:300]
    here = PixelStream(store, pixels, batch_size=64, buffer_pixels=300).gather(chosen)
    there = PixelStream(store, pixels, batch_size=64, buffer_pixels=300, client=client).gather(chosen)
    np.testing.assert_array_equal(here, there)
    # The ensemble trained from cluster-read features is the one trained from local reads.
    settings = TrainSettings(members=1, max_epochs=2, buffer_pixels=300, device="cpu")
    local, _ = train_on_store(tmp_path / "train.zarr", tmp_path / "local", settings, show_progress=False)
    remote, _ = train_on_store(
        tmp_path / "train.zarr", tmp_path / "remote", dataclasses.replace(settings, scheduler=address), show_progress=False
    )
    for mine, theirs in zip(local.members[0].parameters(), remote.members[0].parameters()):
        assert torch.equal(mine, theirs)


def test_an_unreachable_scheduler_is_a_clear_error(dataset, tmp_path):
    checkpoint, images, _ = dataset
    settings = dataclasses.replace(SETTINGS, scheduler="tcp://127.0.0.1:1")
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}), pytest.raises(ValueError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:1"):
        extract_features(checkpoint, images, tmp_path / "store.zarr", settings, show_progress=False)
