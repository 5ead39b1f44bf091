"""What defines a store's contents: its schema, format version, codecs and errors."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

import numpy as np
import zarr
import zarr.codecs

from pipeline.sizes import ImageShape, as_shape
from pipeline.sources.base import ALL_DECODER_BLOCKS, TapShape, steps_per_tap

# 5: an image's checksum is sha256 of its chunks' CRC32Cs (`chunks.crc_digest`); 4: sha256 of its
# values (`regions_sha256`), still read, verified and resumed; 4 brought named taps (`taps/<name>`)
# and a tagged source provenance.
FORMAT_VERSION = 5
READABLE_FORMATS = (4, 5)  # 3 (`block_<b>` arrays, one checkpoint hash) and older: re-extract
TAPS_GROUP = "taps"


# The only codecs a store may use: segcache's own choices (`chunk_codecs`), nothing that unpickles.
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
class StoreSchema:
    """Everything that defines a store's contents; two extractions with equal schemas are the same.

    Attributes:
        layout: "native" or "dense".
        image_size: the model input size: S for S×S (as every square store records it), or
            [H, W] (`image_shape` reads both).
        steps: diffusion steps, in feature order ([] for a source without steps).
        tap_shapes: per tap in feature order, its name and feature map shape.
        source: the feature source's provenance, tagged by "kind" (`FeatureSource.provenance`).
        image_names: the images, in store order.
        image_sha256: their file hashes.
        classes: {"names": [...], "ignore_label": int} when known, else None.
        code_sha256: a digest of the code that computed the features, when the caller gives one
            (the DVC stage does, so a code change rebuilds its store instead of resuming it).
        original_sizes: each image's own [H, W] before resizing, recorded only where some image
            differs from the store's size (None: all are at the store's size), so masks can be
            written back at each image's size.
    """

    layout: str
    image_size: int | list[int]
    steps: list[int]
    tap_shapes: list[TapShape]
    source: dict
    image_names: list[str]
    image_sha256: list[str]
    classes: dict | None = None
    code_sha256: str | None = None
    original_sizes: list[list[int]] | None = None

    @property
    def taps(self) -> list[str]:
        return [shape.name for shape in self.tap_shapes]

    @property
    def image_shape(self) -> ImageShape:
        """(H, W) of the store's images."""
        return as_shape(self.image_size)

    def original_shape(self, index: int) -> ImageShape:
        """(H, W) of image `index` before it was resized to the store's size."""
        return self.image_shape if self.original_sizes is None else as_shape(self.original_sizes[index])

    @property
    def maps_per_tap(self) -> int:
        """T: each tap's maps per image (one per step; one for a source without steps)."""
        return steps_per_tap(self.steps)

    @property
    def feature_dim(self) -> int:
        return self.maps_per_tap * sum(shape.channels for shape in self.tap_shapes)

    def to_json(self) -> dict:
        document = dataclasses.asdict(self)
        if document["original_sizes"] is None:
            del document["original_sizes"]  # a store of images at its own size reads as before the field
        document["format"] = FORMAT_VERSION
        return document

    @classmethod
    def from_json(cls, document: dict) -> StoreSchema:
        """Raises TypeError, KeyError or ValueError on a malformed document."""
        fields = {key: value for key, value in document.items() if key not in ("format", "code_version")}
        fields["tap_shapes"] = [TapShape(**shape) for shape in fields["tap_shapes"]]
        return cls(**fields)


@dataclasses.dataclass(frozen=True)
class FeatureDescription:
    """Which features a store holds: what a head trained on them records, to be applied to others."""

    source: dict
    steps: list[int]
    taps: list[str]
    image_size: int | list[int]  # S for S×S, or [H, W]
    feature_dim: int

    @property
    def image_shape(self) -> ImageShape:
        return as_shape(self.image_size)

    @classmethod
    def of(cls, schema: StoreSchema, selection: FeatureSelection | None = None) -> FeatureDescription:
        """What a store holds, or the `selection` of it."""
        if selection is None:
            return cls(dict(schema.source), list(schema.steps), list(schema.taps), schema.image_size, schema.feature_dim)
        return cls(dict(schema.source), selection.steps, selection.taps, schema.image_size, selection.feature_dim)

    def differences(self, other: FeatureDescription) -> list[str]:
        """'field: this value vs other value' for each field that differs (source keys one by one)."""
        return [f"{name}: {mine!r} vs {theirs!r}" for name, mine, theirs in _differing_fields(self, other)]


@dataclasses.dataclass(frozen=True)
class FeatureSelection:
    """A subset of a store's features, in the store's feature order: some of its steps and taps.

    Attributes:
        steps: the chosen steps ([] for a store without steps).
        step_positions: their positions along each tap array's step axis.
        tap_shapes: the chosen taps.
        columns: int64 (D',): their columns in the store's full pixel feature vector.
    """

    steps: list[int]
    step_positions: list[int]
    tap_shapes: list[TapShape]
    columns: np.ndarray

    @property
    def taps(self) -> list[str]:
        return [shape.name for shape in self.tap_shapes]

    @property
    def feature_dim(self) -> int:
        return len(self.columns)


def select_features(
    schema: StoreSchema, steps: Sequence[int] | None = None, blocks: Sequence[int | str] | None = None
) -> FeatureSelection:
    """Some of a store's steps and taps (None: all), kept in the store's order; taps by name, by
    their guided-diffusion block number, or `ALL_DECODER_BLOCKS` for every numbered tap.

    Raises:
        StoreMismatchError: naming what the store does not hold, and what it holds.
    """
    wanted_steps = list(schema.steps) if steps is None else list(steps)
    missing = [step for step in wanted_steps if step not in schema.steps]
    if missing:
        raise StoreMismatchError(f"the store holds no step {missing}; its steps are {schema.steps}")
    by_name = {shape.name: shape for shape in schema.tap_shapes}
    by_number = {shape.block: shape for shape in schema.tap_shapes if shape.block is not None}
    chosen_names = set()
    for block in schema.taps if blocks is None else blocks:
        if block == ALL_DECODER_BLOCKS and by_number:
            chosen_names.update(shape.name for shape in by_number.values())
            continue
        shape = by_number.get(block) if isinstance(block, int) else by_name.get(block)
        if shape is None:
            known = [shape.name + (f" (block {shape.block})" if shape.block is not None else "") for shape in schema.tap_shapes]
            raise StoreMismatchError(f"the store holds no tap {block!r}; its taps are {known}")
        chosen_names.add(shape.name)
    step_positions = [position for position, step in enumerate(schema.steps) if step in wanted_steps] or [0]
    tap_positions = [position for position, shape in enumerate(schema.tap_shapes) if shape.name in chosen_names]
    widths = [shape.channels for shape in schema.tap_shapes]
    starts = np.cumsum([0, *widths])[:-1]  # each tap's first column within one step's group
    step_width = sum(widths)
    columns = [
        np.arange(step * step_width + starts[tap], step * step_width + starts[tap] + widths[tap])
        for step in step_positions
        for tap in tap_positions
    ]
    return FeatureSelection(
        steps=[schema.steps[position] for position in step_positions] if schema.steps else [],
        step_positions=step_positions,
        tap_shapes=[schema.tap_shapes[position] for position in tap_positions],
        columns=np.concatenate(columns).astype(np.int64),
    )


def tap_array(tap: str) -> str:
    """The native layout's array of a tap: `taps/<name>`, (N, T, C, h, w)."""
    return f"{TAPS_GROUP}/{tap}"


def chunk_codecs(codec: str) -> list:
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


def regions_sha256(regions: Sequence[np.ndarray]) -> np.ndarray:
    """An image's checksum in store format 4: sha256 of its regions' values (features, labels,
    image) in a fixed order, uint8 (32,). Format 5 hashes the chunks' CRC32Cs instead
    (`chunks.crc_digest`): the same protection without a second pass over 50 MB per image."""
    digest = hashlib.sha256()
    for region in regions:
        digest.update(memoryview(np.ascontiguousarray(region)).cast("B"))  # the bytes, not a copy
    return np.frombuffer(digest.digest(), dtype=np.uint8)


def schema_differences(stored: StoreSchema, wanted: StoreSchema) -> list[str]:
    """Names of the fields that differ; inside the source provenance, its keys (`source.noise_seed`)."""
    return [name for name, _, _ in _differing_fields(stored, wanted)]


def _differing_fields(first, second) -> list[tuple[str, object, object]]:
    """(name, first's value, second's value) per differing field of two dataclasses of one kind;
    a differing dict field is compared key by key (`source.checkpoint_sha256`)."""
    found = []
    for field in dataclasses.fields(first):
        mine, theirs = getattr(first, field.name), getattr(second, field.name)
        if mine == theirs:
            continue
        if isinstance(mine, dict) and isinstance(theirs, dict):
            found += [(f"{field.name}.{key}", mine.get(key), theirs.get(key))
                      for key in sorted(mine.keys() | theirs.keys()) if mine.get(key) != theirs.get(key)]
        else:
            found.append((field.name, mine, theirs))
    return found

