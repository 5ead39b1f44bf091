import numpy as np
import pytest
import torch

from pipeline.sources.noise import linear_alphas_cumprod, q_sample, shared_noise


def test_noise_is_drawn_on_the_cpu_from_its_own_seed():
    noise = shared_noise(seed=2, size=8)
    expected = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(noise, expected)
    torch.manual_seed(123)  # the global generator does not matter
    assert torch.equal(shared_noise(seed=2, size=8), expected)


def test_q_sample_uses_the_linear_schedule():
    alphas_cumprod = linear_alphas_cumprod()
    betas = np.linspace(1e-4, 0.02, 1000)
    assert alphas_cumprod[250].item() == pytest.approx(np.prod(1 - betas[:251]))
    images, noise = torch.ones(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)
    assert torch.allclose(q_sample(images, 0, noise, alphas_cumprod), torch.full_like(images, (1 - 1e-4) ** 0.5))
    with pytest.raises(ValueError, match="outside"):
        q_sample(images, 1000, noise, alphas_cumprod)


def test_q_sample_reproduces_the_golden_fixture(shared_dir):
    expected = np.load(shared_dir / "fixtures" / "adm-tiny" / "adm_tiny_expected.npz")
    image, noise = torch.from_numpy(expected["image"])[None], torch.from_numpy(expected["noise"])[None]
    for step in (50, 150, 250):
        noisy = q_sample(image, step, noise, linear_alphas_cumprod())[0].numpy()
        np.testing.assert_allclose(noisy, expected[f"x_t/{step}"], atol=1e-5)
