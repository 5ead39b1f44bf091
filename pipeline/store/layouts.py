"""The two ways a store lays out features, each one object: what arrays it has, how an image's
features are written into them, and how pixel features are read back.

- native (`NATIVE`): each tap at its own resolution, `taps/<name>` (N, T, C, h, w); any pixel's
  vector is made on demand by bilinear interpolation of 4 neighbours per tap.
- dense (`DENSE`): the upsampled pixel features written out, `pixels` (N, H, W, D), in tiles.

Everything else about a store (images, labels, checksums, done marks, claims) is the same for
both, so the writer and the reader ask the layout only these questions.

The reader imports this module, never the other way: a layout reads through `StoreView`, the few
questions it asks of a store, which `reader.FeatureStore` answers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Protocol

import dask
import dask.array
import numpy as np
import torch
import zarr

from pipeline.store.bilinear import gather_pixels, upsample_and_concatenate
from pipeline.store.schema import DENSE_TILE, FeatureSelection, StoreSchema, tap_array


class StoreView(Protocol):
    """What a layout reads a store through (`reader.FeatureStore`), named here so that the
    layouts sit below the reader: the reader imports them, they never import it."""

    group: zarr.Group
    selection: FeatureSelection  # the chosen steps and taps

    @property
    def image_shape(self) -> tuple[int, int]: ...

    @property
    def num_images(self) -> int: ...

    @property
    def feature_dim(self) -> int: ...

    def check_done(self, index: int) -> None: ...

    def read_region(self, array_name: str, index: int, *selection: slice) -> np.ndarray: ...

    def block_tables(self, index: int) -> list[torch.Tensor]: ...

    def image_features(self, index: int) -> np.ndarray: ...


class NativeLayout:
    """Each tap at its own resolution; pixel features interpolated on read."""

    name = "native"

    def feature_arrays(self, schema: StoreSchema) -> dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]]:
        """The layout's feature arrays: name → (dtype, shape, chunk shape), one chunk per image."""
        count = len(schema.image_names)
        arrays = {}
        for shape in schema.tap_shapes:
            dims = (schema.maps_per_tap, shape.channels, shape.height, shape.width)
            arrays[tap_array(shape.name)] = ("float16", (count, *dims), (1, *dims))
        return arrays

    def regions(self, schema: StoreSchema, feature_maps: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, np.ndarray]]:
        """(array name, float16 region) pairs of one image's features."""
        for name in schema.taps:
            yield tap_array(name), feature_maps[name].to(torch.float16).numpy()  # (T, C, h, w)

    def gather_into(
        self, store: StoreView, index: int, ys: np.ndarray, xs: np.ndarray, out: np.ndarray, rows
    ) -> None:
        """Pixels (ys, xs)'s features of one image into `out[rows]` (P, D), a table at a time, so
        the float32 temporaries are one tap's columns (P × C), never the whole (P, D)."""
        ys_tensor, xs_tensor = torch.from_numpy(ys), torch.from_numpy(xs)
        column = 0
        for table in store.block_tables(index):
            columns = slice(column, column + table.shape[0])
            out[rows, columns] = gather_pixels(table, ys_tensor, xs_tensor, store.image_shape).numpy()  # (P, C)
            column = columns.stop

    def image_features(self, store: StoreView, index: int) -> np.ndarray:
        tables = store.block_tables(index)
        pixels = upsample_and_concatenate([table[None] for table in tables], store.image_shape)[0]  # (H, W, D)
        return pixels.to(torch.float16).numpy()

    def to_dask(self, store: StoreView) -> dask.array.Array:
        height, width = store.image_shape
        per_image = [
            dask.array.from_delayed(
                dask.delayed(store.image_features)(index), shape=(height, width, store.feature_dim), dtype=np.float16
            )
            for index in range(store.num_images)
        ]
        return dask.array.stack(per_image)  # one chunk per image


class DenseLayout:
    """The upsampled pixel features written out in (1, tile, tile, D) chunks."""

    name = "dense"

    def feature_arrays(self, schema: StoreSchema) -> dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]]:
        (height, width), count = schema.image_shape, len(schema.image_names)
        tiles = (min(DENSE_TILE, height), min(DENSE_TILE, width))
        return {"pixels": ("float16", (count, height, width, schema.feature_dim), (1, *tiles, schema.feature_dim))}

    def regions(self, schema: StoreSchema, feature_maps: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, np.ndarray]]:
        tables = [feature_maps[name][step] for step in range(schema.maps_per_tap) for name in schema.taps]
        pixels = upsample_and_concatenate([table[None] for table in tables], schema.image_shape)[0]  # (H, W, D)
        yield "pixels", pixels.to(torch.float16).numpy()

    def gather_into(
        self, store: StoreView, index: int, ys: np.ndarray, xs: np.ndarray, out: np.ndarray, rows
    ) -> None:
        """Reads whole tiles (chunks) and picks the pixels from them; never one pixel at a time."""
        store.check_done(index)
        columns = store.selection.columns  # the chosen steps' and taps' columns of each tile's vectors
        picked = np.empty((len(ys), len(columns)), dtype=out.dtype)
        tile_height, tile_width = store.group["pixels"].chunks[1:3]
        tile_ids = (ys // tile_height) * (store.image_shape[1] // tile_width + 1) + xs // tile_width
        for tile_id in np.unique(tile_ids):
            members = np.flatnonzero(tile_ids == tile_id)
            top, left = ys[members[0]] // tile_height * tile_height, xs[members[0]] // tile_width * tile_width
            block = store.read_region(
                "pixels", index, slice(top, top + tile_height), slice(left, left + tile_width))  # (tile_h, tile_w, D)
            picked[members] = block[ys[members] - top, xs[members] - left][:, columns]
        out[rows] = picked

    def image_features(self, store: StoreView, index: int) -> np.ndarray:
        store.check_done(index)
        pixels = store.read_region("pixels", index)  # (H, W, D of the store)
        return pixels if store.feature_dim == pixels.shape[-1] else pixels[..., store.selection.columns]

    def to_dask(self, store: StoreView) -> dask.array.Array:
        pixels = dask.array.from_zarr(store.group["pixels"])  # the store's own tiles
        return pixels if store.feature_dim == pixels.shape[-1] else pixels[..., store.selection.columns]


NATIVE, DENSE = NativeLayout(), DenseLayout()
LAYOUTS = {layout.name: layout for layout in (NATIVE, DENSE)}


def store_arrays(schema: StoreSchema) -> dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """Every array of a store with this schema: name → (dtype, shape, chunk shape)."""
    count, (height, width) = len(schema.image_names), schema.image_shape
    return {
        "images": ("uint8", (count, height, width, 3), (1, height, width, 3)),
        "labels": ("int16", (count, height, width), (1, height, width)),
        "checksums": ("uint8", (count, 32), (1, 32)),
        "done": ("uint8", (count,), (1,)),
        **layout_named(schema.layout).feature_arrays(schema),
    }


def dimension_names(schema: StoreSchema) -> dict[str, tuple[str, ...]]:
    """Every array's named dimensions (what lets xarray open a store); taps have their own sizes."""
    names = {
        "images": ("image", "y", "x", "rgb"),
        "labels": ("image", "y", "x"),
        "checksums": ("image", "sha256_byte"),
        "done": ("image",),
        "pixels": ("image", "y", "x", "feature"),
    }
    for name in schema.taps:
        names[tap_array(name)] = ("image", "step", f"{name}.channel", f"{name}.y", f"{name}.x")
    return names


def layout_named(name: str) -> NativeLayout | DenseLayout:
    """The layout called `name`; a ValueError naming the choices for another."""
    try:
        return LAYOUTS[name]
    except KeyError:
        raise ValueError(f"unknown layout {name!r}; use {' or '.join(LAYOUTS)}") from None
