"""What the refiner sees of an image: the ensemble's class probabilities and a compact, fixed
projection of the pixel features.

The projection is a whitened PCA of the features, fitted once on labeled training pixels. It is
linear, and so is bilinear upsampling, so on a native store it is applied to each (step, tap)
table at the tap's own resolution and upsampled after (Σ_b up(W_b·f_b) = W·up(f)): the
D-dimensional pixel vectors (8448 at the paper's shape) are never formed.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.decomposition import PCA

from pipeline.store.reader import FeatureStore


@dataclasses.dataclass(frozen=True)
class FeatureProjection:
    """x ↦ weight·x + bias: `weight` float32 (P, D), `bias` float32 (P,); P = 0 projects to nothing."""

    weight: np.ndarray
    bias: np.ndarray

    @property
    def dims(self) -> int:
        return len(self.bias)

    @classmethod
    def fit(cls, features: np.ndarray, dims: int, seed: int = 0) -> FeatureProjection:
        """The first `dims` principal components of `features` (N, D), each scaled to unit variance."""
        if dims == 0:
            return cls(np.zeros((0, features.shape[1]), np.float32), np.zeros(0, np.float32))
        pca = PCA(n_components=min(dims, *features.shape), svd_solver="randomized", random_state=seed).fit(features)
        weight = pca.components_ / np.sqrt(pca.explained_variance_ + 1e-12)[:, None]  # (P, D)
        return cls(weight.astype(np.float32), (-weight @ pca.mean_).astype(np.float32))

    def project_image(self, store: FeatureStore, index: int) -> torch.Tensor:
        """float32 (P, H, W): every pixel of a stored image, projected."""
        shape = store.image_shape
        if self.dims == 0:
            return torch.zeros((0, *shape))
        weight = torch.from_numpy(self.weight)
        if store.layout != "native":
            features = torch.from_numpy(store.image_features(index)).float()  # (H, W, D)
            return torch.einsum("pd,hwd->phw", weight, features) + torch.from_numpy(self.bias)[:, None, None]
        tables = store.block_tables(index)  # per (step, tap): (C, h, w)
        projected = torch.from_numpy(self.bias)[:, None, None].expand(-1, *shape).clone()
        for part, table in zip(torch.split(weight, [table.shape[0] for table in tables], dim=1), tables):
            native = torch.einsum("pc,chw->phw", part, table.float())[None]  # (1, P, h, w)
            projected += F.interpolate(native, size=shape, mode="bilinear", align_corners=False)[0]
        return projected


def conditioning(probabilities: np.ndarray | torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
    """The refiner's input channels: class probabilities (K, H, W) and projected features (P, H, W)."""
    return torch.cat([torch.as_tensor(probabilities, dtype=torch.float32), projected])  # (K + P, S, S)
