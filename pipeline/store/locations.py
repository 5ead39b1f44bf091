"""Where a store lives: a local folder or any URL fsspec reaches (s3://, gs://, file://, memory://).

A location is kept as a `Path` when it is local (`file://` URLs included: Zarr's own local store
is the fastest way to a disk) and as the URL string otherwise. Remote access goes through fsspec,
which takes its credentials and endpoint from the usual places for each protocol (for S3:
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL`, `~/.aws/config`), so a URL
alone is enough here and on every Dask worker.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import fsspec
import zarr
import zarr.storage

Location = Path | str


def is_url(location: str | Path) -> bool:
    """Whether `location` names a remote store (a URL with a protocol other than file://)."""
    return isinstance(location, str) and "://" in location and not location.startswith("file://")


def store_location(location: str | Path) -> Location:
    """A store's location in normal form: a `Path` for local folders, the URL string otherwise.

    Raises:
        ValueError: for a `file://` URL naming another host.
    """
    if isinstance(location, Path):
        return location
    if location.startswith("file://"):
        parsed = urlparse(location)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"{location}: a file:// URL must name a local path (file:///path/to/store.zarr)")
        return Path(unquote(parsed.path))
    return location if is_url(location) else Path(location)


def _filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of a URL and the path within it."""
    try:
        return fsspec.url_to_fs(url)
    except (ImportError, ValueError) as error:
        raise ValueError(f"cannot open {url}: {error} (s3:// needs s3fs, gs:// needs gcsfs)") from None


def open_zarr_group(location: Location, mode: str, **options) -> zarr.Group:
    """Opens (mode "r", "r+") or creates (mode "w") the Zarr group at a location.

    Args:
        location: from `store_location`.
        mode: Zarr's open mode.
        options: passed on to `zarr.open_group` (e.g. zarr_format).
    """
    if isinstance(location, Path):
        return zarr.open_group(location, mode=mode, **options)
    store = zarr.storage.FsspecStore.from_url(location, read_only=mode == "r")
    return zarr.open_group(store, mode=mode, **options)


def location_exists(location: Location) -> bool:
    """Whether anything (a file, a folder, an object prefix) is at the location."""
    if isinstance(location, Path):
        return location.exists()
    filesystem, path = _filesystem(location)
    filesystem.invalidate_cache(path)
    return filesystem.exists(path)


def holds_zarr_group(location: Location) -> bool:
    """Whether a Zarr v3 group's metadata (zarr.json) is at the location."""
    if isinstance(location, Path):
        return (location / "zarr.json").is_file()
    filesystem, path = _filesystem(location)
    filesystem.invalidate_cache(path)
    return filesystem.isfile(f"{path.rstrip('/')}/zarr.json")


def remove_location(location: Location) -> None:
    """Deletes everything at the location (a folder tree or all objects under a prefix)."""
    if isinstance(location, Path):
        shutil.rmtree(location)
        return
    filesystem, path = _filesystem(location)
    filesystem.rm(path, recursive=True)
    filesystem.invalidate_cache(path)


def location_bytes(location: Location) -> int:
    """Bytes stored at the location (on disk, or in objects)."""
    if isinstance(location, Path):
        return sum(path.stat().st_size for path in location.rglob("*") if path.is_file())
    filesystem, path = _filesystem(location)
    filesystem.invalidate_cache(path)
    return int(filesystem.du(path, total=True))
