"""`download`: against an HTTP server on 127.0.0.1 started here, which honours Range requests
(as the research file servers do) and can be told to fail, ignore ranges or cut a body short."""

import hashlib
import io
import socket
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
import yaml
from click.testing import CliRunner

from cli import main
from pipeline.data.download import DownloadError, RemoteFile, download_file, preset_files
from pipeline.data.presets import load_preset, preset_names

CONTENT = bytes(range(256)) * 5000  # 1.28 MB: more than one 1 MiB chunk
CONTENT_SHA256 = hashlib.sha256(CONTENT).hexdigest()


class FileServer(BaseHTTPRequestHandler):
    """Serves `files` by path; `behaviour` switches: "ignore_range", "cut" (stop after `cut_after`
    bytes of a body announced in full), or an HTTP status to answer with."""

    files: ClassVar[dict[str, bytes]] = {}
    behaviour: ClassVar[str | int | None] = None
    cut_after: ClassVar[int] = 0
    ranges: ClassVar[list[str | None]] = []  # the Range header of each request, in order

    def do_GET(self):
        type(self).ranges.append(self.headers.get("Range"))
        if isinstance(self.behaviour, int):
            self.send_error(self.behaviour)
            return
        content = self.files.get(self.path)
        if content is None:
            self.send_error(404)
            return
        start = 0
        asked = self.headers.get("Range")
        if asked and self.behaviour != "ignore_range":
            start = int(asked.removeprefix("bytes=").split("-")[0])
            if start >= len(content):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(content)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
        else:
            self.send_response(200)
        body = content[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: self.cut_after] if self.behaviour == "cut" else body)

    def log_message(self, *arguments):  # keep pytest's output clean
        pass


@pytest.fixture
def server():
    """Base URL of a fresh file server serving /model.pt; its switches reset per test."""
    FileServer.files, FileServer.behaviour, FileServer.ranges = {"/model.pt": CONTENT}, None, []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FileServer)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_a_full_download_is_checked_and_renamed_into_place(server, tmp_path):
    target = tmp_path / "checkpoints" / "model.pt"
    result = download_file(RemoteFile(f"{server}/model.pt", target, CONTENT_SHA256), show_progress=False)
    assert target.read_bytes() == CONTENT and not (tmp_path / "checkpoints" / "model.pt.part").exists()
    assert result.checked and result.sha256 == CONTENT_SHA256 and result.resumed_from == 0
    assert FileServer.ranges == [None]
    again = download_file(RemoteFile(f"{server}/model.pt", target, CONTENT_SHA256), show_progress=False)
    assert again.already_present and again.checked and FileServer.ranges == [None]  # nothing fetched twice


def test_a_truncated_part_file_is_resumed_with_a_range_request(server, tmp_path):
    target = tmp_path / "model.pt"
    (tmp_path / "model.pt.part").write_bytes(CONTENT[:300_000])
    result = download_file(RemoteFile(f"{server}/model.pt", target, CONTENT_SHA256), show_progress=False)
    assert FileServer.ranges == ["bytes=300000-"]
    assert result.resumed_from == 300_000 and result.checked and target.read_bytes() == CONTENT


def test_a_cut_connection_keeps_the_part_and_the_next_run_finishes_it(server, tmp_path):
    target = tmp_path / "model.pt"
    FileServer.behaviour, FileServer.cut_after = "cut", 200_000
    with pytest.raises(DownloadError, match=rf"{server}/model.pt.*200000 of {len(CONTENT)} bytes; run again to resume"):
        download_file(RemoteFile(f"{server}/model.pt", target), show_progress=False)
    assert not target.exists() and (tmp_path / "model.pt.part").stat().st_size == 200_000
    FileServer.behaviour = None
    result = download_file(RemoteFile(f"{server}/model.pt", target), show_progress=False)
    assert result.resumed_from == 200_000 and target.read_bytes() == CONTENT
    assert not result.checked and result.sha256 == CONTENT_SHA256  # no sha256 recorded: reported, not checked


def test_a_complete_part_file_is_finished_without_fetching_again(server, tmp_path):
    (tmp_path / "model.pt.part").write_bytes(CONTENT)  # a run killed between the last byte and the rename
    result = download_file(RemoteFile(f"{server}/model.pt", tmp_path / "model.pt", CONTENT_SHA256), show_progress=False)
    assert FileServer.ranges == [f"bytes={len(CONTENT)}-"] and result.checked
    assert (tmp_path / "model.pt").read_bytes() == CONTENT


def test_a_server_that_ignores_the_range_makes_the_part_start_over(server, tmp_path):
    (tmp_path / "model.pt.part").write_bytes(b"stale bytes of another attempt")
    FileServer.behaviour = "ignore_range"
    result = download_file(RemoteFile(f"{server}/model.pt", tmp_path / "model.pt", CONTENT_SHA256), show_progress=False)
    assert result.resumed_from == 0 and (tmp_path / "model.pt").read_bytes() == CONTENT


def test_a_wrong_sha256_is_an_error_and_leaves_no_file(server, tmp_path):
    target = tmp_path / "model.pt"
    with pytest.raises(DownloadError, match=rf"{server}/model.pt: sha256 {CONTENT_SHA256} differs from the recorded 0+"):
        download_file(RemoteFile(f"{server}/model.pt", target, "0" * 64), show_progress=False)
    assert not target.exists() and not (tmp_path / "model.pt.part").exists()


def test_no_server_is_one_clear_error_naming_the_url(tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/model.pt"
    with pytest.raises(DownloadError, match=rf"could not download {url}: .*refused.*no network, or the server is down"):
        download_file(RemoteFile(url, tmp_path / "model.pt"), show_progress=False)
    assert not (tmp_path / "model.pt").exists()


@pytest.mark.parametrize("status", [404, 500])
def test_a_server_error_names_the_url_and_the_status(server, tmp_path, status):
    FileServer.behaviour = status
    with pytest.raises(DownloadError, match=rf"could not download {server}/model.pt: the server answered {status}"):
        download_file(RemoteFile(f"{server}/model.pt", tmp_path / "model.pt"), show_progress=False)


def _dataset_archive() -> bytes:
    """A .tar.gz laid out as the official datasets.tar.gz: <name>/real/{train,test}/…"""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for member in ("tiny_3/real/train/0.png", "tiny_3/real/test/0.png"):
            info = tarfile.TarInfo(member)
            info.size = 4
            archive.addfile(info, io.BytesIO(b"\x89PNG"))
    return buffer.getvalue()


def test_the_download_command_fetches_a_presets_checkpoint_and_dataset(server, tmp_path):
    FileServer.files["/datasets.tar.gz"] = _dataset_archive()
    preset = tmp_path / "tiny_3.yaml"
    preset.write_text(yaml.safe_dump({
        "name": "tiny_3", "class_names": ["a", "b", "c"], "num_classes": 3, "ignore_label": 255,
        "train_images": 1, "test_images": 1, "checkpoint": "model.pt", "checkpoint_url": f"{server}/model.pt",
        "checkpoint_sha256": CONTENT_SHA256, "dataset_url": f"{server}/datasets.tar.gz",
    }))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["--quiet", "download", "--preset", str(preset), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "checkpoints" / "model.pt").read_bytes() == CONTENT
    assert (out / "datasets" / "tiny_3" / "real" / "train" / "0.png").is_file()
    lines = result.output.splitlines()
    assert "model.pt" in lines[0] and "downloaded" in lines[0] and "sha256 matches the preset's" in lines[0]
    assert "datasets.tar.gz" in lines[1] and "sha256 not checked (the preset records none)" in lines[1]


def test_the_download_command_reports_an_unreachable_server_in_one_line(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    preset = tmp_path / "tiny_3.yaml"
    preset.write_text(yaml.safe_dump({
        "name": "tiny_3", "class_names": ["a", "b", "c"], "num_classes": 3, "ignore_label": 255,
        "train_images": 1, "test_images": 1, "checkpoint_url": f"http://127.0.0.1:{port}/model.pt",
    }))
    result = CliRunner().invoke(main, ["--quiet", "download", "--preset", str(preset), "--out", str(tmp_path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().startswith(f"Error: could not download http://127.0.0.1:{port}/model.pt: ")
    assert len(result.output.strip().splitlines()) == 1


def test_every_shipped_preset_names_its_checkpoint_and_the_dataset_archive(tmp_path):
    for name in preset_names():
        checkpoint, dataset = preset_files(load_preset(name), tmp_path)
        assert checkpoint.path == tmp_path / "checkpoints" / load_preset(name).checkpoint
        assert dataset.path == tmp_path / "datasets" / "datasets.tar.gz" and dataset.url.startswith("https://")
