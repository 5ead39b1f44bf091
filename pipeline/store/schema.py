"""What defines a store's contents: its schema, format version, codecs and errors."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Sequence

import numpy as np
import zarr
import zarr.codecs

logger = logging.getLogger(__name__)

FORMAT_VERSION = 3  # 3: every chunk of a done image is on disk, so a missing chunk is damage
READABLE_FORMATS = (2, 3)  # 2: per-image checksums and CRC32C chunks (empty chunks may be absent)


# The only codecs a store may use: segcache's own choices (`_compressors`), nothing that unpickles.
ALLOWED_CODECS = frozenset({"bytes", "blosc", "zstd", "crc32c"})
DENSE_TILE = 32


NO_LABELS = -1


class StoreMismatchError(ValueError):
    """The store holds other features than those asked for."""


class IncompleteImageError(ValueError):
    """An image's features were not (completely) written."""


class StoreFormatError(ValueError):
    """The store was written in another format version."""


class DamagedImageError(ValueError):
    """An image's stored bytes fail their checksum."""


@dataclasses.dataclass(frozen=True)
class BlockShape:
    """One decoder block's activation shape for one image (the same at every step)."""

    block: int
    channels: int
    height: int
    width: int


@dataclasses.dataclass(frozen=True)
class StoreSchema:
    """Everything that defines a store's contents; two extractions with equal schemas are the same.

    Attributes:
        layout: "native" or "dense".
        image_size: S, the model input size.
        steps: diffusion steps, in feature order.
        block_shapes: per block in feature order, its activation shape.
        checkpoint_sha256: hash of the model weights file.
        architecture: the UNet's configuration.
        noise_seed: seed of the shared noise.
        image_names: the images, in store order.
        image_sha256: their file hashes.
        classes: {"names": [...], "ignore_label": int} when known, else None.
    """

    layout: str
    image_size: int
    steps: list[int]
    block_shapes: list[BlockShape]
    checkpoint_sha256: str
    architecture: dict
    noise_seed: int
    image_names: list[str]
    image_sha256: list[str]
    classes: dict | None = None

    @property
    def blocks(self) -> list[int]:
        return [shape.block for shape in self.block_shapes]

    @property
    def feature_dim(self) -> int:
        return len(self.steps) * sum(shape.channels for shape in self.block_shapes)

    def to_json(self) -> dict:
        document = dataclasses.asdict(self)
        document["format"] = FORMAT_VERSION
        return document

    @classmethod
    def from_json(cls, document: dict) -> StoreSchema:
        """Raises TypeError, KeyError or ValueError on a malformed document."""
        fields = {key: value for key, value in document.items() if key not in ("format", "code_version")}
        fields["block_shapes"] = [BlockShape(**shape) for shape in fields["block_shapes"]]
        return cls(**fields)

    def array_layouts(self) -> dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]]:
        """Every array of a store with this schema: name → (dtype, shape, chunk shape)."""
        count, size = len(self.image_names), self.image_size
        arrays = {
            "images": ("uint8", (count, size, size, 3), (1, size, size, 3)),
            "labels": ("int16", (count, size, size), (1, size, size)),
            "checksums": ("uint8", (count, 32), (1, 32)),
            "done": ("uint8", (count,), (1,)),
        }
        if self.layout == "dense":
            tile = min(DENSE_TILE, size)
            arrays["pixels"] = ("float16", (count, size, size, self.feature_dim), (1, tile, tile, self.feature_dim))
        for shape in self.block_shapes if self.layout == "native" else []:
            dims = (len(self.steps), shape.channels, shape.height, shape.width)
            arrays[f"block_{shape.block}"] = ("float16", (count, *dims), (1, *dims))
        return arrays

    def dimension_names(self) -> dict[str, tuple[str, ...]]:
        """Every array's named dimensions (what lets xarray open a store); blocks have their own sizes."""
        names = {
            "images": ("image", "y", "x", "rgb"),
            "labels": ("image", "y", "x"),
            "checksums": ("image", "sha256_byte"),
            "done": ("image",),
            "pixels": ("image", "y", "x", "feature"),
        }
        for shape in self.block_shapes:
            block = shape.block
            names[f"block_{block}"] = ("image", "step", f"channel_{block}", f"y_{block}", f"x_{block}")
        return names


def _compressors(codec: str) -> list:
    """The chunk codecs: the compressor, then a CRC32C that makes every read check its chunk."""
    if codec == "blosc-lz4":
        compressors = [zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]
    elif codec == "zstd":
        compressors = [zarr.codecs.ZstdCodec(level=3)]
    elif codec == "none":
        compressors = []
    else:
        raise ValueError(f"unknown codec {codec!r}; use blosc-lz4, zstd or none")
    return [*compressors, zarr.codecs.Crc32cCodec()]


def image_digest(regions: Sequence[np.ndarray]) -> np.ndarray:
    """sha256 of an image's stored regions (features, labels, image) in a fixed order, uint8 (32,)."""
    digest = hashlib.sha256()
    for region in regions:
        digest.update(np.ascontiguousarray(region).tobytes())
    return np.frombuffer(digest.digest(), dtype=np.uint8)


def _schema_differences(stored: StoreSchema, wanted: StoreSchema) -> list[str]:
    differences = []
    for field in dataclasses.fields(StoreSchema):
        if getattr(stored, field.name) != getattr(wanted, field.name):
            differences.append(field.name)
    return differences

