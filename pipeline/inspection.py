"""Offline looks into a feature store: what it holds, and single pixels' features."""

from __future__ import annotations

import numpy as np

from pipeline.store import FeatureStore


def store_summary(store: FeatureStore) -> dict:
    """A JSON-ready description of a store: contents, shapes, provenance and size on disk."""
    schema = store.schema
    done = int(store.done_mask().sum())
    disk_bytes = store.disk_bytes()
    return {
        "path": str(store.path),
        "layout": schema.layout,
        "images": {"total": store.num_images, "done": done},
        "image_size": schema.image_size,
        "steps": schema.steps,
        "blocks": [
            {"block": shape.block, "channels": shape.channels, "height": shape.height, "width": shape.width}
            for shape in schema.block_shapes
        ],
        "feature_dim": schema.feature_dim,
        "classes": schema.classes,
        "provenance": {
            "checkpoint_sha256": schema.checkpoint_sha256,
            "noise_seed": schema.noise_seed,
            "architecture": schema.architecture,
            "code_version": store.code_version,
        },
        "disk_bytes": disk_bytes,
        "disk_bytes_per_image": disk_bytes / done if done else None,
    }


def resolve_image(store: FeatureStore, image: str) -> int:
    """An image given by index ("3") or by name ("img001") → its index in the store."""
    names = store.image_names
    if image in names:
        return names.index(image)
    if image.lstrip("-").isdigit() and 0 <= int(image) < len(names):
        return int(image)
    raise ValueError(f"{store.path} has no image {image!r}: give an index 0..{len(names) - 1} or a name")


def pixel_feature_vector(store: FeatureStore, image: str, y: int, x: int) -> list[float]:
    """One pixel's full feature vector, in feature order."""
    size = store.image_size
    if not (0 <= y < size and 0 <= x < size):
        raise ValueError(f"pixel ({y}, {x}) is outside the {size}×{size} image")
    index = resolve_image(store, image)
    features = store.pixel_features(index, np.array([y]), np.array([x]))  # (1, D)
    return [float(value) for value in features[0]]


def format_summary(summary: dict) -> str:
    """The summary as a few readable lines."""
    blocks = ", ".join(
        f"{block['block']} ({block['channels']}×{block['height']}×{block['width']})" for block in summary["blocks"]
    )
    per_image = summary["disk_bytes_per_image"]
    classes = summary["classes"]
    lines = [
        f"store       {summary['path']}",
        f"layout      {summary['layout']}",
        f"images      {summary['images']['done']} of {summary['images']['total']} done, "
        f"{summary['image_size']}×{summary['image_size']}",
        f"steps       {summary['steps']}",
        f"blocks      {blocks}",
        f"features    {summary['feature_dim']} per pixel",
        f"classes     {len(classes['names'])} (ignore label {classes['ignore_label']})" if classes else "classes     unknown",
        f"checkpoint  sha256 {summary['provenance']['checkpoint_sha256']}",
        f"noise seed  {summary['provenance']['noise_seed']}",
        f"on disk     {summary['disk_bytes'] / 1e6:.2f} MB"
        + (f" ({per_image / 1e6:.3f} MB per image)" if per_image else ""),
    ]
    return "\n".join(lines)
