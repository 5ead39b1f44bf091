import numpy as np
import torch

from pipeline.store.bilinear import gather_pixels, upsample_and_concatenate


def _gather(tables, ys, xs, size):
    ys, xs = torch.as_tensor(np.asarray(ys)), torch.as_tensor(np.asarray(xs))
    return torch.cat([gather_pixels(table, ys, xs, size) for table in tables], dim=1).numpy()  # (P, ΣC)


def test_gathered_pixels_equal_full_upsampling():
    generator = torch.Generator().manual_seed(0)
    tables = [torch.randn(5, 4, 4, generator=generator), torch.randn(3, 8, 8, generator=generator),
              torch.randn(2, 32, 32, generator=generator)]
    dense = upsample_and_concatenate([table[None] for table in tables], 32)[0].numpy()  # (32, 32, 10)
    ys, xs = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    gathered = _gather(tables, ys.ravel(), xs.ravel(), 32)
    assert gathered.shape == (1024, 10)
    np.testing.assert_allclose(gathered, dense.reshape(1024, 10), atol=1e-6)


def test_non_integer_scale_matches_interpolate():
    table = torch.randn(3, 7, 7, generator=torch.Generator().manual_seed(1))
    dense = upsample_and_concatenate([table[None]], 50)[0].numpy()
    ys = np.array([0, 1, 24, 49, 13]); xs = np.array([49, 0, 25, 49, 7])
    np.testing.assert_allclose(_gather([table], ys, xs, 50), dense[ys, xs], atol=1e-5)


def test_concatenation_order_is_the_given_order():
    first, second = torch.ones(2, 4, 4), torch.zeros(3, 2, 2)
    dense = upsample_and_concatenate([first[None], second[None]], 8)
    assert dense.shape == (1, 8, 8, 5)
    assert (dense[0, :, :, :2] == 1).all() and (dense[0, :, :, 2:] == 0).all()
