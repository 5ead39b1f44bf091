import numpy as np
import pytest
import torch

from pipeline.sources.noise import add_noise, alphas_cumprod_float64, paper_scheduler, shared_noise


def test_noise_is_drawn_on_the_cpu_from_its_own_seed():
    noise = shared_noise(seed=2, shape=(1, 3, 8, 8))
    expected = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(noise, expected)
    torch.manual_seed(123)  # the global generator does not matter
    assert torch.equal(shared_noise(seed=2, shape=(1, 3, 8, 8)), expected)


def test_the_paper_schedule_is_linear_beta_over_1000_steps():
    alphas_cumprod = paper_scheduler().alphas_cumprod
    betas = np.linspace(1e-4, 0.02, 1000)
    assert alphas_cumprod[250].item() == pytest.approx(np.prod(1 - betas[:251]), rel=1e-5)
    images, noise = torch.ones(2, 3, 2, 2), torch.zeros(1, 3, 2, 2)
    assert torch.allclose(add_noise(images, 0, noise, paper_scheduler()), torch.full_like(images, (1 - 1e-4) ** 0.5))
    with pytest.raises(ValueError, match="outside 0..999"):
        add_noise(images, 1000, noise, paper_scheduler())


def test_the_schedule_is_computed_in_float64_as_guided_diffusion_does():
    alphas_cumprod = alphas_cumprod_float64(paper_scheduler())
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    np.testing.assert_allclose(alphas_cumprod.numpy(), np.cumprod(1.0 - betas), rtol=1e-14)  # guided-diffusion's
    # diffusers' own float32 schedule is close but not equal (it moved the demo's features).
    assert 0 < (paper_scheduler().alphas_cumprod.double() - alphas_cumprod).abs().max() < 1e-5
    images, noise = torch.rand(2, 3, 4, 4), torch.randn(1, 3, 4, 4)
    alpha_bar = alphas_cumprod[250].item()
    expected = alpha_bar**0.5 * images + (1 - alpha_bar) ** 0.5 * noise
    assert torch.equal(add_noise(images, 250, noise, paper_scheduler()), expected)


def test_noising_reproduces_the_golden_fixture(shared_dir):
    expected = np.load(shared_dir / "fixtures" / "adm-tiny" / "adm_tiny_expected.npz")
    image, noise = torch.from_numpy(expected["image"])[None], torch.from_numpy(expected["noise"])[None]
    for step in (50, 150, 250):
        noisy = add_noise(image, step, noise, paper_scheduler())[0].numpy()
        np.testing.assert_allclose(noisy, expected[f"x_t/{step}"], atol=1e-5)
