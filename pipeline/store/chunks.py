"""An image's chunks: encoded and written straight to their files, their CRC32C trailers, and the
image checksum built from those trailers.

A chunk is what Zarr itself would write: the array's values little-endian in C order (the
`bytes` codec), compressed if the array has blosc or zstd, then the CRC32C of all that as 4
little-endian bytes (the `crc32c` codec), so any Zarr reader decodes it and checks it. The test
`test_store::test_chunks_are_byte_for_byte_what_zarr_writes` holds the two to the same bytes.

Why not zarr's own `array[i] = region`: at the paper's shape (50 MB of float16 per image) that
path cost 0.13–0.23 CPU-seconds per image on our 2-core VM (README, Performance): a copy of every
chunk to append its CRC32C, and the kernel's copy of every byte into freshly allocated page-cache
pages (on a VM, each first touch of such a page is a trip to the hypervisor). Here a chunk's
CRC32C is computed once and kept (`crc_digest` makes the image's checksum from them, so no second
pass over the bytes), and the file is written with direct I/O from an aligned buffer that is
reused from image to image: one memcpy, no page cache.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import itertools
import mmap
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import google_crc32c
import numcodecs
import numpy as np
import zarr
from zarr.abc.store import SuffixByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

# Direct I/O wants the buffer's address and the write's length in multiples of the disk's logical
# block (512 B or 4 KiB on the disks we know); a filesystem that wants more gets a buffered write.
ALIGNMENT = 4096
TRAILER_BYTES = 4  # the CRC32C at the end of every chunk
# A chunk smaller than this (an image's checksum, done mark, labels, pixels) goes through the page
# cache: with direct I/O each such write waits for the disk, and at every image's end the checksum
# and the done mark waited one after the other while the disk had nothing else to do. Their few
# pages cost the kernel little; the page cache's cost is in the features' megabytes.
DIRECT_IO_MIN_BYTES = 1 << 20
_SHUFFLES = {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "shuffle": numcodecs.Blosc.SHUFFLE,
             "bitshuffle": numcodecs.Blosc.BITSHUFFLE}


class ChunkEncoder:
    """Encodes (and decodes) chunks of one array as its codecs say: `bytes`, then blosc, zstd or
    nothing, then `crc32c` (what segcache creates; anything else is a ValueError naming the array)."""

    def __init__(self, array: zarr.Array):
        self.array = array
        self.dtype = np.dtype(array.dtype).newbyteorder("<")
        self.compressor = _compressor(array)

    def encode(self, chunk: np.ndarray) -> tuple[np.ndarray, bytes]:
        """One chunk (the array's chunk shape) → (payload, trailer): uint8 (L,), and the payload's
        CRC32C as 4 bytes. Without a compressor the payload is the chunk's own memory, not a copy."""
        values = np.ascontiguousarray(chunk, dtype=self.dtype).reshape(-1).view(np.uint8)  # (bytes,)
        payload = values if self.compressor is None else np.frombuffer(self.compressor.encode(values), np.uint8)
        return payload, google_crc32c.value(payload).to_bytes(TRAILER_BYTES, "little")

    def decode(self, stored: bytes) -> np.ndarray | None:
        """A chunk as stored (payload, then its CRC32C trailer) → its values, in the array's chunk
        shape; None where the trailer does not match the payload (damage)."""
        payload, trailer = stored[:-TRAILER_BYTES], stored[-TRAILER_BYTES:]
        if len(stored) < TRAILER_BYTES or google_crc32c.value(payload).to_bytes(TRAILER_BYTES, "little") != trailer:
            return None
        raw = payload if self.compressor is None else self.compressor.decode(payload)
        return np.frombuffer(raw, dtype=self.dtype).reshape(self.array.chunks)


def _compressor(array: zarr.Array) -> numcodecs.abc.Codec | None:
    """numcodecs' codec for the array's compressor, set up as Zarr sets it up from the same settings."""
    codecs = [codec.to_dict() for codec in array.metadata.codecs]
    names = [codec["name"] for codec in codecs]
    if names[0] != "bytes" or names[-1] != "crc32c" or len(names) > 3:
        raise ValueError(f"array `{array.path}` has the codecs {names}; segcache writes bytes, blosc or zstd, crc32c")
    if codecs[0].get("configuration", {}).get("endian", "little") != "little":
        raise ValueError(f"array `{array.path}` stores big-endian values; segcache writes little-endian")
    if len(names) == 2:
        return None
    name, settings = names[1], codecs[1]["configuration"]
    if name == "blosc":
        return numcodecs.Blosc(cname=settings["cname"], clevel=settings["clevel"], shuffle=_SHUFFLES[settings["shuffle"]],
                               blocksize=settings["blocksize"], typesize=settings["typesize"])
    if name == "zstd":
        return numcodecs.Zstd(level=settings["level"], checksum=settings["checksum"])
    raise ValueError(f"array `{array.path}` is compressed with {name!r}; segcache writes blosc or zstd")


def chunk_keys(array: zarr.Array, index: int) -> list[str]:
    """Keys (from the array's path) of the chunks that hold image `index`, in C order of the grid."""
    return [f"{array.path}/{array.metadata.encode_chunk_key(coords)}" for coords in _chunk_grid(array, index)]


def _chunk_grid(array: zarr.Array, index: int) -> Iterator[tuple[int, ...]]:
    counts = [-(-length // chunk) for length, chunk in zip(array.shape[1:], array.chunks[1:])]
    for coords in itertools.product(*map(range, counts)):
        yield (index, *coords)


def image_chunks(array: zarr.Array, index: int, region: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    """(key, chunk) pairs of image `index`'s region of `array`, in `chunk_keys` order.

    Args:
        array: an array with one image along its first axis per chunk.
        index: the image.
        region: the image's values, the array's shape without its first axis.

    A chunk is a view of the region where the region fills it; an edge chunk that the region
    only partly fills is padded with the array's fill value, as Zarr stores edge chunks.
    """
    shape = array.chunks  # (1, …)
    for key, coords in zip(chunk_keys(array, index), _chunk_grid(array, index)):
        part = region[tuple(slice(start * size, (start + 1) * size) for start, size in zip(coords[1:], shape[1:]))]
        if part.shape != shape[1:]:
            padded = np.full(shape[1:], array.fill_value, dtype=array.dtype)
            padded[tuple(slice(0, length) for length in part.shape)] = part
            part = padded
        yield key, part[None]  # (1, …): the chunk's own shape


def crc_digest(trailers: Sequence[bytes]) -> np.ndarray:
    """An image's checksum (store format 5): sha256 of its chunks' CRC32C trailers in store order,
    uint8 (32,).

    Each trailer is the CRC32C of its chunk's bytes, so any other content in a chunk changes this
    digest, but for a 2⁻³² chance per chunk: a rewrite by any writer, even one that writes a valid
    chunk with a fresh CRC32C, is named by `inspect --verify`. Hashing 4 bytes per chunk instead
    of the image's 50 MB is what makes it cheap.
    """
    return np.frombuffer(hashlib.sha256(b"".join(trailers)).digest(), dtype=np.uint8)


def read_trailers(array: zarr.Array, index: int) -> list[bytes | None]:
    """The stored CRC32C trailer of each chunk of image `index` (None for a missing chunk): the
    last 4 bytes of each, read without reading the rest."""
    prototype = default_buffer_prototype()
    found = [sync(array.store.get(key, prototype, byte_range=SuffixByteRequest(TRAILER_BYTES)))
             for key in chunk_keys(array, index)]
    return [None if buffer is None else buffer.to_bytes() for buffer in found]


class AlignedBuffers:
    """Page-aligned buffers for direct I/O, kept from one image to the next and shared by threads.

    A fresh buffer per chunk would be faulted in page by page on every image; kept, a buffer's
    pages stay mapped. At most one buffer per chunk being written at once is ever made.
    """

    def __init__(self):
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def holding(self, size: int) -> Iterator[np.ndarray]:
        """A buffer of at least `size` bytes (uint8, a multiple of `ALIGNMENT`), this thread's alone until the block ends."""
        with self._lock:
            fitting = [buffer for buffer in self._free if buffer.size >= size]
            buffer = min(fitting, key=len) if fitting else None
            if buffer is not None:
                self._free = [other for other in self._free if other is not buffer]
        if buffer is None:
            buffer = np.frombuffer(mmap.mmap(-1, _rounded_up(size)), dtype=np.uint8)  # anonymous: page-aligned
        try:
            yield buffer
        finally:
            with self._lock:
                self._free.append(buffer)


def _rounded_up(size: int) -> int:
    return -(-size // ALIGNMENT) * ALIGNMENT


def partial_path(path: Path) -> Path:
    """Where a chunk file is written before it is renamed into place: `<chunk>.partial` beside it.

    One name per chunk, so that the writer of an image (who holds its claim) removes what a
    killed writer left by name, without listing a folder that holds a file per image, and a
    second writer of the same chunk at once fails (`FileExistsError`) instead of mixing bytes.
    """
    return path.with_name(f"{path.name}.partial")


def write_chunk_file(path: Path, payload: np.ndarray, trailer: bytes, buffers: AlignedBuffers) -> None:
    """Writes payload + trailer to `path`, whole or not at all: into `partial_path(path)`, which is
    then renamed over it. With direct I/O where the filesystem takes it; elsewhere (tmpfs on older
    kernels, macOS), and for a chunk smaller than `DIRECT_IO_MIN_BYTES`, through the page cache.

    Raises:
        FileExistsError: another writer is writing this chunk (or was killed doing it and its
            leftover was not removed first).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(path)
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        try:
            if payload.size + TRAILER_BYTES < DIRECT_IO_MIN_BYTES or not _write_direct(descriptor, payload, trailer, buffers):
                _write_buffered(descriptor, payload, trailer)
        finally:
            os.close(descriptor)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _write_direct(descriptor: int, payload: np.ndarray, trailer: bytes, buffers: AlignedBuffers) -> bool:
    """Writes the file with O_DIRECT from an aligned copy, zero-padded to whole blocks, then cuts
    it to its length. False, with the file empty again, where direct I/O is refused."""
    if not _direct_io_taken(descriptor):
        return False
    size = payload.size + TRAILER_BYTES
    try:
        with buffers.holding(size) as buffer:
            buffer[: payload.size] = payload  # numpy copies without holding the GIL
            buffer[payload.size : size] = np.frombuffer(trailer, dtype=np.uint8)
            buffer[size : _rounded_up(size)] = 0
            _write_all(descriptor, buffer[: _rounded_up(size)])
        os.ftruncate(descriptor, size)
        return True
    except OSError as error:
        if error.errno != errno.EINVAL:  # a full disk and other errors are the caller's
            raise
    # A filesystem that wants larger blocks than ALIGNMENT: start again, through the page cache.
    fcntl.fcntl(descriptor, fcntl.F_SETFL, fcntl.fcntl(descriptor, fcntl.F_GETFL) & ~os.O_DIRECT)
    os.ftruncate(descriptor, 0)
    os.lseek(descriptor, 0, os.SEEK_SET)
    return False


def _direct_io_taken(descriptor: int) -> bool:
    """Switches the open file to direct I/O (Linux); False where the platform or the filesystem refuses."""
    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        fcntl.fcntl(descriptor, fcntl.F_SETFL, fcntl.fcntl(descriptor, fcntl.F_GETFL) | os.O_DIRECT)
    except OSError as error:
        if error.errno == errno.EINVAL:
            return False
        raise
    return True


def _write_buffered(descriptor: int, payload: np.ndarray, trailer: bytes) -> None:
    """Writes the file through the page cache, and asks the kernel to start writing it to the disk
    now (Linux), so the disk works while the next image is encoded instead of all at the end."""
    _write_all(descriptor, payload)
    _write_all(descriptor, np.frombuffer(trailer, dtype=np.uint8))
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)


def _write_all(descriptor: int, data: np.ndarray) -> None:
    """os.write until every byte is written (a single write may take fewer)."""
    view = memoryview(data)
    while view.nbytes:
        view = view[os.write(descriptor, view) :]
