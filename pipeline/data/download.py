"""Fetching a preset's official files: its checkpoint and its dataset archive (`download`).

Checkpoints are gigabytes on slow research servers, so a download is written to `<file>.part`
and continued with an HTTP Range request when a run was cut off; only a complete file whose
sha256 matches the preset's record (where it records one) is renamed to its final name, so a
file under that name is always whole. The standard library's urllib is enough for this: no
HTTP package is added to the dependencies.
"""

from __future__ import annotations

import dataclasses
import http.client
import logging
import os
import re
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from pipeline.data.presets import Preset
from pipeline.runtime.hashing import file_sha256

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20  # read and write 1 MiB at a time: the progress bar moves, memory stays flat
TIMEOUT_SECONDS = 60  # per connection attempt and per read: a stalled server becomes an error, not a hang


class DownloadError(OSError):
    """A download failed: no network, a server error, a cut connection or a wrong checksum.

    An OSError, so that the command line reports it as one line like other I/O failures.
    """


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """One file to fetch.

    Attributes:
        url: where it is published.
        path: where it goes on this machine.
        sha256: its recorded hex sha256; "" when none is recorded (the file is then not checked).
    """

    url: str
    path: Path
    sha256: str = ""


@dataclasses.dataclass(frozen=True)
class DownloadResult:
    """What `download_file` did.

    Attributes:
        path: the complete file.
        sha256: its hex sha256, as computed here.
        checked: whether it was compared with a recorded sha256 (and matched).
        resumed_from: bytes that a previous run had fetched into `.part` (0: from the start).
        already_present: the file was there before and nothing was fetched.
    """

    path: Path
    sha256: str
    checked: bool
    resumed_from: int = 0
    already_present: bool = False


def preset_files(preset: Preset, out_dir: str | Path) -> list[RemoteFile]:
    """The files a preset names, placed where the benchmark pipeline looks for them
    (presets/dvc.yaml): the checkpoint in `<out>/checkpoints/`, the dataset archive in
    `<out>/datasets/`.

    Raises:
        ValueError: the preset names no checkpoint URL and no dataset URL.
    """
    out_dir = Path(out_dir)
    files = []
    if preset.checkpoint_url:
        name = preset.checkpoint or preset.checkpoint_url.rsplit("/", 1)[-1]
        files.append(RemoteFile(preset.checkpoint_url, out_dir / "checkpoints" / name, preset.checkpoint_sha256))
    if preset.dataset_url:
        name = preset.dataset_url.rsplit("/", 1)[-1]
        files.append(RemoteFile(preset.dataset_url, out_dir / "datasets" / name, preset.dataset_sha256))
    if not files:
        raise ValueError(f"preset {preset.name!r} names no checkpoint_url and no dataset_url: nothing to download")
    return files


def download_file(remote: RemoteFile, show_progress: bool = True) -> DownloadResult:
    """Fetches `remote.url` into `remote.path`, continuing a `.part` file left by a cut run.

    Steps: 1. a file already at `remote.path` is kept (checked when a sha256 is recorded);
    2. the request asks for the bytes after those in `.part` (a server that ignores the
    range sends everything, and `.part` starts over); 3. the body is appended in chunks;
    4. a recorded sha256 is compared; 5. `.part` is renamed to the final name.

    Raises:
        DownloadError: one line naming the URL: unreachable server, HTTP error, a connection
            cut before the announced length, or a sha256 other than the recorded one (the
            `.part` file is then removed, and no file gets the final name).
    """
    final, partial = Path(remote.path), Path(f"{remote.path}.part")
    if final.is_file():
        return DownloadResult(final, *_check(final, remote, remove_on_mismatch=False), already_present=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    offset = partial.stat().st_size if partial.is_file() else 0
    resumed_from = _fetch(remote.url, partial, offset, show_progress)
    digest, checked = _check(partial, remote, remove_on_mismatch=True)
    os.replace(partial, final)  # same folder: atomic, so the final name only ever holds a whole file
    return DownloadResult(final, digest, checked, resumed_from)


def _fetch(url: str, partial: Path, offset: int, show_progress: bool) -> int:
    """Appends the rest of `url` to `partial`; returns how many bytes were kept from before."""
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:  # nothing after `offset`: the last run fetched everything
            return offset
        raise DownloadError(f"could not download {url}: the server answered {error.code} {error.reason}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise DownloadError(f"could not download {url}: {reason} (no network, or the server is down?)") from None
    with response:
        if response.status != 206:  # 200: the server sent the whole file, whatever was asked
            offset = 0
        elif _range_start(response.headers.get("Content-Range")) != offset:
            raise DownloadError(f"could not download {url}: the server resumed at another byte than {offset}")
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        _copy_body(url, response, partial, offset, total, show_progress)
    return offset


def _copy_body(url: str, response, partial: Path, offset: int, total: int | None, show_progress: bool) -> None:
    """Writes the response body after the first `offset` bytes of `partial`."""
    written = offset
    bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
               desc=partial.name.removesuffix(".part"), disable=not show_progress)
    with bar, open(partial, "r+b" if offset else "wb") as stream:
        stream.truncate(offset)
        stream.seek(offset)
        try:
            while chunk := response.read(CHUNK_BYTES):
                stream.write(chunk)
                written += len(chunk)
                bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as error:  # a reset connection, a read timeout mid-file
            raise DownloadError(
                f"could not download {url}: the connection broke after {written} bytes ({error}); "
                "run again to resume"
            ) from None
    if total is not None and written < total:
        raise DownloadError(f"could not download {url}: got {written} of {total} bytes; run again to resume")


def _range_start(content_range: str | None) -> int | None:
    """"bytes 100-199/200" → 100."""
    match = re.match(r"bytes (\d+)-", content_range or "")
    return int(match.group(1)) if match else None


def _check(path: Path, remote: RemoteFile, remove_on_mismatch: bool) -> tuple[str, bool]:
    """(the file's sha256, whether it was compared with a recorded one).

    Raises:
        DownloadError: it differs from the recorded sha256 (and the file is removed when asked).
    """
    digest = file_sha256(path)
    if not remote.sha256:
        return digest, False
    if digest != remote.sha256.lower():
        if remove_on_mismatch:
            path.unlink()
        raise DownloadError(
            f"{remote.url}: sha256 {digest} differs from the recorded {remote.sha256}"
            + ("; the download was removed, run again" if remove_on_mismatch else f"; remove {path} and run again")
        )
    return digest, True


def extract_archive(archive: Path, into: Path) -> None:
    """Unpacks a dataset archive (.tar.gz) into `into`, as the official download script does.

    tarfile's "data" filter refuses members that would land outside `into` (absolute paths,
    `..`, links out), so an archive from the network cannot write elsewhere.
    """
    into.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as bundle:
        bundle.extractall(into, filter="data")


def download_preset(preset: Preset, out_dir: str | Path, show_progress: bool = True) -> list[DownloadResult]:
    """Fetches a preset's checkpoint and dataset archive into `out_dir` (`preset_files`), and
    unpacks the archive into `<out>/datasets/` unless the preset's folder is there already."""
    results = []
    for remote in preset_files(preset, out_dir):
        result = download_file(remote, show_progress)
        results.append(result)
        if remote.url == preset.dataset_url and not (result.path.parent / preset.name).exists():
            logger.info("unpacking %s into %s", result.path, result.path.parent)
            extract_archive(result.path, result.path.parent)
    return results
