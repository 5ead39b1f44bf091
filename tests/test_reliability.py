"""Reliability across stages: kill -9 and resume, concurrent writers, a full disk, bad inputs
through the command line, untrusted files.

Kills are real: a stage runs as a subprocess, stops at a named pause point
(`pipeline/runtime/pause_points.py`, switched on by environment variables) and is killed there with
SIGKILL, so "halfway through image 2" is hit every time. Every resumed result is compared with an
uninterrupted run, image for image, bit for bit.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

import stages.train
from cli import main
from conftest import PROJECT_ROOT, write_image_folder, write_learnable_store
from pipeline.config import ExtractSettings, TrainSettings
from pipeline.data.folders import ClassInfo
from pipeline.extraction.extract import extract_features
from pipeline.heads.pixel_ensemble.ensemble import load_ensemble
from pipeline.heads.pixel_ensemble.training import train_on_store
from pipeline.pretrain.ddpm import PretrainSettings, pretrain_ddpm
from pipeline.sources.tiny_unet import make_tiny_unet
from pipeline.store.reader import FeatureStore
from pipeline.store.schema import IncompleteImageError

CLASSES = {"names": ["background", "disc", "square"], "ignore_label": 255}
IMAGES = 5
SETTINGS = ExtractSettings(steps=[50, 250], blocks=[5, 8, 12], seed=0, size=32, batch_size=1, device="cpu")
EXTRACT_OPTIONS = ["--steps", "50,250", "--blocks", "5,8,12", "--size", "32", "--batch-size", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    make_tiny_unet(sample_size=32, seed=0).save_pretrained(root / "unet")
    write_image_folder(root / "data" / "images", count=IMAGES)
    (root / "data" / "classes.json").write_text(json.dumps(CLASSES))
    return root


@pytest.fixture(scope="module")
def reference_store(workspace) -> FeatureStore:
    """What an uninterrupted extraction writes (in this process)."""
    path = workspace / "reference.zarr"
    extract_features(
        workspace / "unet", workspace / "data" / "images", path, SETTINGS, ClassInfo(**CLASSES), show_progress=False
    )
    return FeatureStore(path)


def extract_arguments(workspace: Path, store_path: Path, images: Path | None = None, checkpoint: Path | None = None):
    """`extract` of the workspace's images with its tiny UNet, unless told other ones."""
    return [
        "extract", "--checkpoint", str(checkpoint or workspace / "unet"),
        "--images", str(images or workspace / "data" / "images"), "--store", str(store_path), *EXTRACT_OPTIONS,
    ]


def cli_command(arguments: list[str], prelude: str = "") -> list[str]:
    """`python cli.py --quiet ARGUMENTS`, optionally after some Python that patches the process."""
    launcher = f"import sys\nsys.argv = ['cli.py', '--quiet', *sys.argv[1:]]\n{prelude}\nfrom cli import main\nmain()\n"
    return [sys.executable, "-c", launcher, *map(str, arguments)]


def environment(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT), **extra}


def run_to_the_end(command: list[str], cwd: Path = PROJECT_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=environment(), capture_output=True, text=True, timeout=300)


def kill_at(point: str, command: list[str], scratch: Path, cwd: Path = PROJECT_ROOT) -> None:
    """Runs `command` until it reaches pause point `point`, then kill -9s it there."""
    marker, log = scratch / f"paused-{point.replace(':', '-')}", scratch / f"log-{point.replace(':', '-')}"
    with open(log, "w") as output:
        process = subprocess.Popen(
            command, cwd=cwd, stdout=output, stderr=subprocess.STDOUT,
            env=environment(SEGCACHE_PAUSE_AT=point, SEGCACHE_PAUSE_MARKER=str(marker)),
        )
        try:
            deadline = time.monotonic() + 240
            while not marker.exists():
                assert process.poll() is None, f"ended ({process.returncode}) before {point}: {log.read_text()}"
                assert time.monotonic() < deadline, f"never reached {point}: {log.read_text()}"
                time.sleep(0.02)
            os.kill(process.pid, signal.SIGKILL)
            assert process.wait(timeout=60) == -signal.SIGKILL
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def assert_same_as_uninterrupted(store_path: Path, reference: FeatureStore) -> None:
    store = FeatureStore(store_path)
    assert store.schema == reference.schema
    assert store.done_mask().all() and store.damaged_images() == []
    for index in range(reference.num_images):
        # The checksum covers every stored byte of the image: features, labels and pixels.
        np.testing.assert_array_equal(store.group["checksums"][index], reference.group["checksums"][index])
        for mine, theirs in zip(store.block_tables(index), reference.block_tables(index)):
            assert torch.equal(mine, theirs), index
    assert not list(store_path.rglob("*.partial")), "leftovers of killed chunk writes"


# --- 1. kill and resume -------------------------------------------------------------------------

# Stops the process with half of image {index}'s block 8 chunk in its temporary file, as a kill
# during that chunk write leaves it (the writer writes `<chunk>.partial`, then renames it).
HALF_WRITTEN_CHUNK = """
import pipeline.store.writer as writer
from pipeline.runtime.pause_points import pause_point
write_chunk_file = writer.write_chunk_file
def write_half_then_pause(path, payload, trailer, buffers):
    if path.as_posix().endswith("/taps/up_blocks.2.upsamplers.0/c/{index}/0/0/0/0"):  # block 8 of the tiny UNet
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_name(path.name + ".partial").write_bytes(payload.tobytes()[: payload.size // 2])
        pause_point("chunk-half-written", {index})
    return write_chunk_file(path, payload, trailer, buffers)
writer.write_chunk_file = write_half_then_pause
"""

# (pause point, launcher prelude), one run each; each run resumes the one before and is killed at
# an image after the last one killed that is still pending.
EXTRACT_KILLS = [
    ("write-image-begin", ""),  # before the image's first chunk
    ("chunk-half-written", HALF_WRITTEN_CHUNK),  # during one of the image's chunk writes
    ("write-image-features-written", ""),  # between chunks: the image's features, no done mark
]


@pytest.mark.slow
def test_extract_killed_at_any_moment_resumes_to_the_uninterrupted_store(workspace, reference_store, tmp_path):
    store_path = tmp_path / "store.zarr"
    arguments = extract_arguments(workspace, store_path)
    finished, killed = [], 0
    for name, prelude in EXTRACT_KILLS:
        killed = next(index for index in range(killed + 1, IMAGES) if index not in finished)
        kill_at(f"{name}:{killed}", cli_command(arguments, prelude.format(index=killed)), tmp_path)
        store = FeatureStore(store_path)  # a reader between runs sees only whole images
        finished = np.flatnonzero(store.done_mask()).tolist()
        # Two images are written at once (IMAGES_IN_FLIGHT): the killed image's neighbour on
        # either side may be unfinished (before it) or finished (after it); no other.
        assert set(range(killed - 1)) <= set(finished) <= {*range(killed), killed + 1}, (name, killed, finished)
        assert all(store.verify_image(index) for index in finished)
        with pytest.raises(IncompleteImageError, match=f"img_00{killed}"):
            store.image_features(killed)
        if prelude:
            assert list(store_path.rglob("*.partial"))  # the killed chunk write left its temporary file
    last = CliRunner().invoke(main, ["--quiet", *arguments])  # the last run: in this process
    assert last.exit_code == 0, last.output
    assert f"{IMAGES - len(finished)} of {IMAGES} images written" in last.output
    assert_same_as_uninterrupted(store_path, reference_store)  # no *.partial left either


PRETRAIN = PretrainSettings(
    image_size=32, block_out_channels=[32, 32], attention_levels=[1], steps=6, batch_size=2, checkpoint_every=2,
    sample_count=1, sample_inference_steps=1, device="cpu",
)
PRETRAIN_OPTIONS = [
    "--steps", "6", "--batch-size", "2", "--image-size", "32", "--channels", "32,32", "--attention-levels", "1",
    "--checkpoint-every", "2", "--sample-count", "1", "--sample-steps", "1", "--device", "cpu",
]


@pytest.mark.slow
def test_pretrain_killed_resumes_from_its_last_checkpoint_exactly(workspace, tmp_path):
    images = write_image_folder(tmp_path / "unlabeled", count=4, labeled=False)
    out = tmp_path / "run"
    arguments = ["pretrain", "--images", images, "--out", out, *PRETRAIN_OPTIONS]
    # Killed while writing its second checkpoint (staged, not yet renamed over the first).
    kill_at("pretrain-state-staged:4", cli_command(arguments), tmp_path)
    assert torch.load(out / "state.pt", weights_only=True)["step"] == 2
    assert (out / "model" / "config.json").is_file()
    finished = CliRunner().invoke(main, ["--quiet", *map(str, arguments)])  # the rerun, in this process
    assert finished.exit_code == 0, finished.output
    assert "6 steps (from 2)" in finished.output
    pretrain_ddpm(images, tmp_path / "straight", PRETRAIN, show_progress=False)
    resumed, straight = (torch.load(path / "state.pt", weights_only=True) for path in (out, tmp_path / "straight"))
    assert torch.equal(resumed["losses"], straight["losses"])
    for part in ("model", "ema"):
        for name, tensor in straight[part].items():
            assert torch.equal(resumed[part][name], tensor), f"{part}.{name}"
    assert (out / "loss.csv").read_text() == (tmp_path / "straight" / "loss.csv").read_text()
    assert not list(out.glob("*.tmp"))


TRAIN = {"members": 2, "max_epochs": 15, "patience": 1000, "seed": 0, "device": "cpu", "threads": 1,
         "steps": None, "blocks": None}  # every step and tap of the synthetic store


def test_train_killed_keeps_the_old_ensemble_and_a_rerun_matches(tmp_path, monkeypatch):
    project = tmp_path / "project"
    write_learnable_store(project / "data" / "stores" / "train.zarr")
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["train"].update(TRAIN)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    out = project / "data" / "models" / "ensemble"
    # An ensemble of an earlier run (another seed) is in place when the new run is killed.
    old_settings = TrainSettings(**{**params["train"], "seed": 1})
    train_on_store(project / "data" / "stores" / "train.zarr", out, old_settings, show_progress=False)
    old = load_ensemble(out)
    command = [
        sys.executable, "-m", "stages.train", "--store", "data/stores/train.zarr", "--out", "data/models/ensemble",
        "--log", "data/curves/train.json", "--chart", "data/curves/train.png",
    ]
    log = tmp_path / "train.log"
    with open(log, "w") as output:
        process = subprocess.Popen(command, cwd=project, env=environment(), stdout=output, stderr=subprocess.STDOUT)
        try:
            while "labeled pixels" not in log.read_text():  # training starts now
                assert process.poll() is None, log.read_text()
                time.sleep(0.01)
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert process.returncode == -signal.SIGKILL, log.read_text()
    survivor = load_ensemble(out)  # never half of one: the old ensemble, whole
    for before, after in zip(old.members, survivor.members):
        for (name, tensor), (_, kept) in zip(before.state_dict().items(), after.state_dict().items()):
            assert torch.equal(tensor, kept), name
    monkeypatch.chdir(project)  # the rerun, in this process: the stage's own code path
    monkeypatch.setattr(sys, "argv", command[2:])
    stages.train.main()
    train_on_store(project / "data" / "stores" / "train.zarr", tmp_path / "straight", TrainSettings(**params["train"]),
                   show_progress=False)
    rerun, straight = load_ensemble(out), load_ensemble(tmp_path / "straight")
    for mine, theirs in zip(rerun.members, straight.members):
        for (name, tensor), (_, expected) in zip(mine.state_dict().items(), theirs.state_dict().items()):
            assert torch.equal(tensor, expected), name
    assert json.loads((project / "data" / "curves" / "train.json").read_text())
    assert sorted(path.name for path in out.parent.iterdir()) == ["ensemble"]


class _Killed(BaseException):
    """Stands for SIGKILL: nothing catches it, no cleanup runs after it."""


def test_saving_an_ensemble_killed_at_any_step_never_leaves_one_that_loads_half(tmp_path, monkeypatch):
    import pipeline.heads.pixel_ensemble.ensemble as ensemble_module

    store = tmp_path / "train.zarr"
    write_learnable_store(store)
    settings = TrainSettings(**{**TRAIN, "max_epochs": 2})
    old, _ = train_on_store(store, tmp_path / "ensemble", settings, show_progress=False)
    new, _ = train_on_store(store, tmp_path / "unused", replace(settings, seed=5), show_progress=False)
    # The file-system steps of save_ensemble, each of which a kill can precede.
    steps = {"save_file": ensemble_module, "write_text": Path, "rename": Path}
    originals = {name: getattr(owner, name) for name, owner in steps.items()}
    originals["rmtree"] = shutil.rmtree
    found = []
    for kill_before in range(1, 8):
        count = [0]

        def step(name, *arguments, **keywords):
            count[0] += 1
            if count[0] == kill_before:
                raise _Killed(name)
            return originals[name](*arguments, **keywords)

        with monkeypatch.context() as patch:
            for name, owner in steps.items():
                patch.setattr(owner, name, lambda *a, _name=name, **k: step(_name, *a, **k))
            patch.setattr(shutil, "rmtree", lambda *a, **k: step("rmtree", *a, **k))
            try:
                ensemble_module.save_ensemble(new, tmp_path / "ensemble")
            except _Killed:
                pass
        try:
            survivor = load_ensemble(tmp_path / "ensemble")
        except FileNotFoundError:  # killed between the two renames: no ensemble, never half of one
            survivor = None
        found.append(None if survivor is None else "old" if survivor.logs == old.logs else "new")
        if survivor is not None:
            expected = old if survivor.logs == old.logs else new
            for mine, theirs in zip(survivor.members, expected.members):
                for (name, tensor), (_, whole) in zip(mine.state_dict().items(), theirs.state_dict().items()):
                    assert torch.equal(tensor, whole), (kill_before, name)
        ensemble_module.save_ensemble(old, tmp_path / "ensemble")  # the rerun: back to the old one
        assert load_ensemble(tmp_path / "ensemble").logs == old.logs
    # Steps: weights, config, clear the retired slot, old → retired, new → in place, delete retired.
    assert found == ["old", "old", "old", "old", None, "new", "new"]


# --- 5. concurrency -------------------------------------------------------------------------------

# Slows every image write down, so that two processes surely overlap.
SLOW_WRITES = """
import time
from pipeline.store.writer import FeatureStoreWriter
write_image = FeatureStoreWriter.write_image
def slow_write_image(self, *arguments):
    time.sleep(0.3)
    write_image(self, *arguments)
FeatureStoreWriter.write_image = slow_write_image
"""


@pytest.mark.slow
def test_two_extracts_on_one_store_share_its_images_and_readers_see_only_whole_ones(
    workspace, reference_store, tmp_path
):
    store_path = tmp_path / "store.zarr"
    command = cli_command(extract_arguments(workspace, store_path), SLOW_WRITES)
    processes = [
        subprocess.Popen(command, cwd=PROJECT_ROOT, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
        for _ in range(2)
    ]
    checked = set()
    while any(process.poll() is None for process in processes):
        if (store_path / "zarr.json").is_file():  # created atomically: whole once it is there
            store = FeatureStore(store_path)
            for index in np.flatnonzero(store.done_mask()):
                assert store.verify_image(int(index))
                checked.add(int(index))
        time.sleep(0.1)
    outputs = [process.communicate() for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    written = [int(re.search(r"(\d+) of 5 images written", stdout).group(1)) for stdout, _ in outputs]
    print(f"images written by each of the two processes: {written}")
    assert sum(written) == IMAGES, written  # every image written once, by one of them
    assert checked, "the reader saw no finished image while the writers ran"
    assert_same_as_uninterrupted(store_path, reference_store)


# --- 6. disk full ---------------------------------------------------------------------------------


def test_a_full_disk_stops_extract_clearly_keeps_the_finished_images_and_a_rerun_completes(
    workspace, reference_store, tmp_path, monkeypatch
):
    from pipeline.store import writer

    store_path = tmp_path / "store.zarr"
    write_chunk_file = writer.write_chunk_file

    def disk_full_from_image_2(path, payload, trailer, buffers):
        parts = path.relative_to(store_path).parts if path.is_relative_to(store_path) else ()
        if len(parts) >= 3 and parts[1] == "c" and parts[2] == "2":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return write_chunk_file(path, payload, trailer, buffers)

    monkeypatch.setattr(writer, "write_chunk_file", disk_full_from_image_2)
    result = CliRunner().invoke(main, ["--quiet", *extract_arguments(workspace, store_path)])
    assert result.exit_code == 1
    assert "disk full" in result.output and str(store_path) in result.output
    monkeypatch.undo()
    store = FeatureStore(store_path)
    done = np.flatnonzero(store.done_mask()).tolist()
    # Images 0 and 1 came before; image 3, written beside image 2, may have finished too.
    assert done[:2] == [0, 1] and 2 not in done and len(done) <= 3, done
    assert f"{len(done)} of {IMAGES} images finished so far are complete" in result.output and "re-run" in result.output
    assert all(store.verify_image(index) for index in done)
    assert not list(store_path.rglob("*.partial"))
    again = CliRunner().invoke(main, ["--quiet", *extract_arguments(workspace, store_path)])
    assert again.exit_code == 0, again.output
    assert f"{IMAGES - len(done)} of {IMAGES} images written" in again.output
    assert_same_as_uninterrupted(store_path, reference_store)


# Runs extract on a small tmpfs that a filler file has mostly used up, then copies the store out
# (the mount lives only as long as this script's namespace).
FULL_DISK_SCRIPT = """
set -eu
mount -t tmpfs -o size=$SIZE tmpfs "$DISK"
head -c $FILLER /dev/zero > "$DISK/filler"
set +e
"$@" > "$OUT/extract.log" 2>&1; echo $? > "$OUT/extract.rc"
cp -a "$DISK/store.zarr" "$OUT/store.zarr"
"""


def test_a_real_full_disk(workspace, reference_store, tmp_path):
    """extract on a small tmpfs (mounted in a user namespace, where permitted) that fills up midway."""
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("no user namespaces here to mount a small tmpfs in")
    files = [path for path in reference_store.path.rglob("*") if path.is_file()]
    image_bytes = sum(path.stat().st_blocks * 512 for path in files if "/c/0" in path.as_posix())
    size = 4 << 20
    # Room for the empty store and two and a half images (tmpfs counts whole 4 KiB pages).
    filler = size - (sum(path.name == "zarr.json" for path in files) * 4096 + 2.5 * image_bytes + 32 * 4096)
    (tmp_path / "disk").mkdir()
    (tmp_path / "out").mkdir()
    command = cli_command(extract_arguments(workspace, tmp_path / "disk" / "store.zarr"))
    subprocess.run(
        [unshare, "-rm", "sh", "-c", FULL_DISK_SCRIPT, "full-disk", *command], cwd=PROJECT_ROOT, timeout=300, check=True,
        env=environment(SIZE=str(size), FILLER=str(int(filler)), DISK=str(tmp_path / "disk"), OUT=str(tmp_path / "out")),
    )
    log = (tmp_path / "out" / "extract.log").read_text()
    assert (tmp_path / "out" / "extract.rc").read_text().strip() == "1", log
    assert "disk full" in log and "No space left on device" in log and "re-run extract" in log
    store_path = tmp_path / "out" / "store.zarr"
    full = FeatureStore(store_path)
    done = np.flatnonzero(full.done_mask()).tolist()
    assert 0 < len(done) < IMAGES and f"{len(done)} of {IMAGES} images finished" in log, log
    assert all(full.verify_image(index) for index in done)
    # The store, moved where there is room, is finished by a rerun.
    again = CliRunner().invoke(main, ["--quiet", *extract_arguments(workspace, store_path)])
    assert again.exit_code == 0 and f"{IMAGES - len(done)} of {IMAGES} images written" in again.output, again.output
    assert_same_as_uninterrupted(store_path, reference_store)


# --- 3. bad inputs, through the command line ------------------------------------------------------


def _random_rgb(height: int = 32, width: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _damaged_copy(folder: Path, suffix: str, damage: str) -> str:
    whole = folder / f"whole{suffix}"
    Image.fromarray(_random_rgb()).save(whole)
    data = bytearray(whole.read_bytes())
    whole.unlink()
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif suffix == ".png":  # bytes of the compressed pixels flipped: the chunk's CRC and zlib catch it
        for offset in range(len(data) // 2, len(data) // 2 + 4):
            data[offset] ^= 0xFF
    else:  # a garbled Huffman table. (Flipped bits in a JPEG's entropy-coded data usually decode to a
        # wrong picture without any error: JPEG has no checksum, so no reader can refuse that.)
        table = data.find(b"\xff\xc4")
        data[table + 4 : table + 20] = b"\xff" * 16
    (folder / f"broken{suffix}").write_bytes(bytes(data))
    return f"broken{suffix}"


def _labeled_image(folder: Path, labels: np.ndarray, shape: tuple[int, int] = (32, 32)) -> str:
    Image.fromarray(_random_rgb(*shape)).save(folder / "img.png")
    np.save(folder / "img.npy", labels)
    return "img.npy"


def _out_of_range_labels(folder: Path) -> str:
    (folder / "classes.json").write_text(json.dumps(CLASSES))
    labels = np.zeros((32, 32), np.int64)
    labels[3, 4] = 7  # neither a class (0..2) nor the ignore label 255
    return _labeled_image(folder, labels)


def _nan_labels(folder: Path) -> str:
    labels = np.zeros((32, 32), np.float32)
    labels[5, 5] = np.nan
    return _labeled_image(folder, labels)


def _duplicate_stems(folder: Path) -> str:
    Image.fromarray(_random_rgb()).save(folder / "scene.png")
    Image.fromarray(_random_rgb()).save(folder / "scene.jpg")
    return "scene"


# case → a function that fills the folder and returns what the message must name
BAD_IMAGE_FOLDERS = {
    "empty folder": lambda folder: "no PNG or JPEG images",
    "non-image files only": lambda folder: [(folder / "notes.txt").write_text("hi"), "no PNG or JPEG images"][1],
    "text file named .png": lambda folder: [(folder / "fake.png").write_text("not an image"), "fake.png"][1],
    "truncated PNG": lambda folder: _damaged_copy(folder, ".png", "truncated"),
    "corrupt PNG": lambda folder: _damaged_copy(folder, ".png", "corrupt"),
    "truncated JPEG": lambda folder: _damaged_copy(folder, ".jpg", "truncated"),
    "corrupt JPEG": lambda folder: _damaged_copy(folder, ".jpg", "corrupt"),
    "label map of the wrong shape": lambda folder: _labeled_image(folder, np.zeros((16, 16), np.uint8)),
    "label map of a non-integer dtype": lambda folder: _labeled_image(folder, np.full((32, 32), 0.5, np.float32)),
    "NaN in a float label map": _nan_labels,
    "label values out of range": _out_of_range_labels,
    "duplicate stems": _duplicate_stems,
}


@pytest.mark.parametrize("case", list(BAD_IMAGE_FOLDERS))
def test_bad_image_folders_are_refused_before_anything_is_written(workspace, tmp_path, case):
    folder = tmp_path / "images"
    folder.mkdir()
    named = BAD_IMAGE_FOLDERS[case](folder)
    store_path = tmp_path / "store.zarr"
    result = CliRunner().invoke(main, ["--quiet", *extract_arguments(workspace, store_path, images=folder)])
    assert result.exit_code == 1, result.output
    assert named in result.output and str(folder) in result.output, result.output
    assert "Traceback" not in result.output
    assert not store_path.exists()


def test_grayscale_rgba_16_bit_and_unicode_names_are_handled(workspace, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rgb = _random_rgb()
    gray16 = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 61).astype(np.uint16)  # 0..62,403
    Image.fromarray(rgb[..., 0]).save(folder / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full((32, 32), 7, np.uint8)])).save(folder / "rgba.png")
    Image.fromarray(gray16).save(folder / "gray16.png")
    Image.fromarray(rgb).save(folder / "ünï cødé 名前 1.png")
    result = CliRunner().invoke(main, ["--quiet", *extract_arguments(workspace, tmp_path / "store.zarr", images=folder)])
    assert result.exit_code == 0, result.output
    store = FeatureStore(tmp_path / "store.zarr")
    assert store.image_names == ["gray", "gray16", "rgba", "ünï cødé 名前 1"]
    np.testing.assert_array_equal(store.image(0), np.repeat(rgb[..., :1], 3, axis=2))  # gray → R = G = B
    np.testing.assert_array_equal(store.image(1)[..., 0], (gray16 >> 8).astype(np.uint8))  # the high byte, not clipped
    np.testing.assert_array_equal(store.image(2), rgb)  # alpha dropped
    np.testing.assert_array_equal(store.image(3), rgb)
    shown = CliRunner().invoke(main, ["inspect", "--store", str(tmp_path / "store.zarr"), "--image", "ünï cødé 名前 1",
                                      "--pixel", "3", "4"])
    assert shown.exit_code == 0 and len(shown.output.split()) == store.feature_dim, shown.output


def _not_a_state_dict(folder: Path) -> Path:
    torch.save([torch.zeros(2)], folder / "list.pt")
    return folder / "list.pt"


def _truncated_weights(folder: Path, workspace: Path) -> Path:
    shutil.copytree(workspace / "unet", folder / "truncated_unet")
    weights = folder / "truncated_unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder / "truncated_unet"


def _other_architecture(folder: Path, workspace: Path) -> Path:
    shutil.copytree(workspace / "unet", folder / "other_unet")
    config = json.loads((folder / "other_unet" / "config.json").read_text())
    config["block_out_channels"] = [2 * channels for channels in config["block_out_channels"]]
    (folder / "other_unet" / "config.json").write_text(json.dumps(config))
    return folder / "other_unet"


def _unrelated_network(folder: Path) -> Path:
    torch.save({"encoder.weight": torch.zeros(4, 4)}, folder / "classifier.pt")
    return folder / "classifier.pt"


BAD_CHECKPOINTS = {
    "not a state dict": lambda folder, workspace: _not_a_state_dict(folder),
    "truncated": _truncated_weights,
    "weights of another architecture": _other_architecture,
    "not a diffusion UNet": lambda folder, workspace: _unrelated_network(folder),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_bad_checkpoints_are_refused_naming_the_file(workspace, tmp_path, case):
    checkpoint = BAD_CHECKPOINTS[case](tmp_path, workspace)
    arguments = extract_arguments(workspace, tmp_path / "store.zarr", checkpoint=checkpoint)
    result = CliRunner().invoke(main, ["--quiet", *arguments])
    assert result.exit_code == 1 and checkpoint.name in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "store.zarr").exists()


class _CreatesFileWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_payloads_never_run_in_checkpoints_or_training_states(workspace, tmp_path):
    marker = tmp_path / "pwned.txt"
    evil = {"weight": torch.zeros(1), "payload": _CreatesFileWhenUnpickled(marker)}
    torch.save(evil, tmp_path / "evil.pt")
    arguments = extract_arguments(workspace, tmp_path / "store.zarr", checkpoint=tmp_path / "evil.pt")
    result = CliRunner().invoke(main, ["--quiet", *arguments])
    assert result.exit_code == 1 and "evil.pt" in result.output and "weights_only" in result.output
    (tmp_path / "run").mkdir()
    torch.save({**evil, "format": 1}, tmp_path / "run" / "state.pt")  # a planted pretraining checkpoint
    images = write_image_folder(tmp_path / "unlabeled", count=2, labeled=False)
    result = CliRunner().invoke(main, ["--quiet", "pretrain", "--images", str(images), "--out", str(tmp_path / "run"),
                                       *PRETRAIN_OPTIONS])
    assert result.exit_code == 1 and "state.pt" in result.output, result.output
    assert not marker.exists() and not (tmp_path / "store.zarr").exists()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [("--steps", "50,1000", "0..999"), ("--steps", "-1,50", "0..999"), ("--blocks", "5,40", "40")],
)
def test_steps_and_blocks_outside_the_model_are_refused(workspace, tmp_path, option, value, message):
    arguments = extract_arguments(workspace, tmp_path / "store.zarr")
    arguments[arguments.index(option) + 1] = value
    result = CliRunner().invoke(main, ["--quiet", *arguments])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "store.zarr").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [({"stepz": [50]}, r"unknown key\(s\) \['stepz'\]"), ({"steps": "50,150"}, "`steps` must be list"),
     ({"seed": 1.5}, "`seed` must be int"), ({"steps": [50, 1200]}, "0..999")],
)
def test_params_yaml_with_unknown_or_mistyped_keys_stops_the_stage(workspace, tmp_path, monkeypatch, change, message):
    import stages.extract

    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["extract"].update(change)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [
        "extract", "--checkpoint", str(workspace / "unet"), "--images", str(workspace / "data" / "images"),
        "--store", "data/stores/train.zarr",
    ])
    with pytest.raises(ValueError, match=rf"params\.yaml: extract: .*{message}"):
        stages.extract.main()
    assert not (tmp_path / "data").exists()
