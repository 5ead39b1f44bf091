"""Offline looks into a feature store: what it holds, and single pixels' features."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline import sizes
from pipeline.store.reader import FeatureStore


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
        "taps": [
            {"name": shape.name, "channels": shape.channels, "height": shape.height, "width": shape.width}
            for shape in schema.tap_shapes
        ],
        "feature_dim": schema.feature_dim,
        "classes": schema.classes,
        "provenance": {**schema.source, "code_version": store.code_version},
        "disk_bytes": disk_bytes,
        "disk_bytes_per_image": disk_bytes / done if done else None,
    }


def checkpoint_taps(checkpoint: str | Path, size: int | None = None) -> list[dict]:
    """The modules of a checkpoint's UNet that can be taps, with their shapes for a size×size
    image (default: the size the model was trained at)."""
    from pipeline.sources.diffusion_unet import list_taps
    from pipeline.sources.loading import probe_source

    source, size = probe_source(checkpoint, size)
    return list_taps(source.unet, lambda: source.probe(size))


def format_taps(taps: list[dict]) -> str:
    """One line per tap: name, guided-diffusion block number if it has one, C×h×w."""
    width = max(len(tap["name"]) for tap in taps)
    return "\n".join(
        f"{tap['name']:<{width}}  {'block ' + str(tap['block']) if tap['block'] is not None else '':<8}  "
        f"{tap['channels']}×{tap['height']}×{tap['width']}"
        for tap in taps
    )


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
    height, width = store.image_shape
    if not (0 <= y < height and 0 <= x < width):
        raise ValueError(f"pixel ({y}, {x}) is outside the {width}×{height} (width × height) image")
    index = resolve_image(store, image)
    features = store.pixel_features(index, np.array([y]), np.array([x]))  # (1, D)
    return [float(value) for value in features[0]]


def format_summary(summary: dict) -> str:
    """The summary as a few readable lines."""
    taps = ", ".join(f"{tap['name']} ({tap['channels']}×{tap['height']}×{tap['width']})" for tap in summary["taps"])
    provenance = summary["provenance"]
    per_image = summary["disk_bytes_per_image"]
    classes = summary["classes"]
    lines = [
        f"store       {summary['path']}",
        f"layout      {summary['layout']}",
        f"images      {summary['images']['done']} of {summary['images']['total']} done, "
        f"{sizes.describe(summary['image_size'])}",
        f"steps       {summary['steps']}",
        f"taps        {taps}",
        f"features    {summary['feature_dim']} per pixel",
        f"classes     {len(classes['names'])} (ignore label {classes['ignore_label']})" if classes else "classes     unknown",
        f"source      {provenance['kind']}"
        + (f", checkpoint sha256 {provenance['checkpoint_sha256']}" if "checkpoint_sha256" in provenance else "")
        + (f", noise seed {provenance['noise_seed']}" if "noise_seed" in provenance else ""),
        f"on disk     {summary['disk_bytes'] / 1e6:.2f} MB"
        + (f" ({per_image / 1e6:.3f} MB per image)" if per_image else ""),
    ]
    for row in summary.get("tap_statistics", []):
        lines.append(
            f"  {row['features']:<12} mean {row['mean']:+.4f}  std {row['std']:.4f}  zeros {100 * row['zero_fraction']:.1f} %"
        )
    return "\n".join(lines)


def feature_groups(store: FeatureStore) -> list[tuple[str, slice]]:
    """(label, channel range) of each (step, tap) in the pixel feature vector, in feature order."""
    groups, start = [], 0
    for step in store.schema.steps or [None]:
        for shape in store.schema.tap_shapes:
            label = shape.name if step is None else f"t{step} {shape.name}"
            groups.append((label, slice(start, start + shape.channels)))
            start += shape.channels
    return groups


def tap_statistics(store: FeatureStore, max_images: int = 8) -> list[dict]:
    """Mean, standard deviation and fraction of exact zeros of each (step, tap)'s features,
    over the upsampled pixels of up to `max_images` finished images."""
    indices = np.flatnonzero(store.done_mask())[:max_images]
    totals = {label: [0.0, 0.0, 0, 0] for label, _ in feature_groups(store)}  # sum, sum of squares, zeros, count
    for index in indices:
        pixels = store.image_features(int(index)).astype(np.float64)  # (S, S, D)
        for label, channels in feature_groups(store):
            values = pixels[..., channels]
            total = totals[label]
            total[0] += values.sum()
            total[1] += (values**2).sum()
            total[2] += int((values == 0).sum())
            total[3] += values.size
    statistics = []
    for label, (value_sum, square_sum, zeros, count) in totals.items():
        mean = value_sum / count if count else float("nan")
        variance = square_sum / count - mean**2 if count else float("nan")
        statistics.append(
            {"features": label, "mean": mean, "std": float(np.sqrt(max(variance, 0.0))), "zero_fraction": zeros / count if count else float("nan")}
        )
    return statistics


def principal_components_rgb(features: np.ndarray) -> np.ndarray:
    """The first three principal components of pixel features as an RGB picture.

    Args:
        features: (H, W, C) pixel features.

    Returns:
        uint8 (H, W, 3): component k in channel k, each stretched to its 1st–99th percentile.
    """
    from sklearn.decomposition import PCA  # imported here: scikit-learn takes seconds to import

    height, width, channels = features.shape
    flat = features.reshape(height * width, channels).astype(np.float64)  # (H·W, C)
    components = min(3, channels, height * width)
    # Deterministic (fixed seed, signs fixed by scikit-learn); randomized: fast at 8448 channels.
    projected = PCA(n_components=components, svd_solver="randomized", random_state=0).fit_transform(flat)  # (H·W, k)
    low, high = np.percentile(projected, 1, axis=0), np.percentile(projected, 99, axis=0)
    scaled = np.clip((projected - low) / np.maximum(high - low, 1e-12), 0, 1)
    rgb = np.zeros((height * width, 3))
    rgb[:, :components] = scaled
    return (rgb.reshape(height, width, 3) * 255).round().astype(np.uint8)


def cosine_similarity_map(store: FeatureStore, reference: np.ndarray, index: int) -> np.ndarray:
    """Cosine similarity of every pixel of image `index` to a reference feature vector, (S, S)."""
    pixels = store.image_features(index).astype(np.float32)  # (S, S, D)
    norms = np.linalg.norm(pixels, axis=-1) * np.linalg.norm(reference)
    return (pixels @ reference) / np.maximum(norms, 1e-12)


def export_pixel_features(store: FeatureStore, image: str, pixels: list[tuple[int, int]], out: Path) -> np.ndarray:
    """Writes chosen pixels' feature vectors to `.npy` (float32 (P, D)) or `.csv` (y, x, features)."""
    index = resolve_image(store, image)
    ys, xs = np.array([y for y, _ in pixels]), np.array([x for _, x in pixels])
    features = store.pixel_features(index, ys, xs)  # (P, D)
    out = Path(out)
    if out.suffix == ".npy":
        np.save(out, features)
    elif out.suffix == ".csv":
        header = "y,x," + ",".join(f"f{k}" for k in range(features.shape[1]))
        np.savetxt(out, np.column_stack([ys, xs, features]), delimiter=",", header=header, comments="", fmt="%.6g")
    else:
        raise ValueError(f"export to .npy or .csv, not {out.name}")
    return features


def save_pca_pictures(store: FeatureStore, image: str, out: Path) -> None:
    """The first three principal components of one image's features as RGB: per (step, tap)
    and for the whole vector, beside the image, in one grid."""
    from pipeline.pictures.figures import save_picture_grid

    index = resolve_image(store, image)
    features = store.image_features(index)  # (S, S, D) float16
    pictures = [("image", store.image(index)), ("all features", principal_components_rgb(features))]
    pictures += [(label, principal_components_rgb(features[..., channels])) for label, channels in feature_groups(store)]
    columns = len(store.schema.tap_shapes)
    save_picture_grid(out, pictures, f"{store.image_names[index]}: first 3 principal components as RGB", max(columns, 2))


def save_similarity_pictures(store: FeatureStore, image: str, y: int, x: int, out: Path, others: list[str]) -> None:
    """Cosine similarity of every pixel of an image (and of `others`) to one pixel's features."""
    from pipeline.pictures.figures import save_picture_grid

    index = resolve_image(store, image)
    reference = np.array(pixel_feature_vector(store, image, y, x), dtype=np.float32)
    pictures = []
    for name in [image, *others]:
        other = resolve_image(store, name)
        pictures.append((store.image_names[other], store.image(other)))
        pictures.append(("cosine similarity", cosine_similarity_map(store, reference, other)))
    save_picture_grid(
        out, pictures, f"similarity to pixel ({y}, {x}) of {store.image_names[index]}", 2, markers={0: (y, x), 1: (y, x)},
        colour_bar_label="cosine similarity",
    )
