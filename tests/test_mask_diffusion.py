"""The refiner's forward process and network: closed-form marginals, draws that follow them, shapes."""

import pytest
import torch

from pipeline.refine.denoiser import MaskDenoiser
from pipeline.refine.mask_diffusion import MaskDiffusion


def test_marginals_are_the_closed_form_and_draws_follow_them():
    diffusion = MaskDiffusion(num_classes=4, steps=10)
    assert diffusion.alpha_bar[0] == 1.0 and diffusion.alpha_bar[-1] == 0.0
    assert torch.all(diffusion.alpha_bar[1:] < diffusion.alpha_bar[:-1])  # noisier at every step
    x0 = torch.tensor([[[0, 1], [2, 3]]])  # (1, 2, 2)
    for step in (0, 3, 7, 10):
        t = torch.tensor([step])
        alpha = float(diffusion.alpha_bar[step])
        expected = torch.full((1, 4, 2, 2), (1 - alpha) / 4)
        for y, x in ((0, 0), (0, 1), (1, 0), (1, 1)):
            expected[0, x0[0, y, x], y, x] += alpha
        marginals = diffusion.marginals(x0, t)
        torch.testing.assert_close(marginals, expected)
        torch.testing.assert_close(marginals.sum(dim=1), torch.ones(1, 2, 2))
        draws = diffusion.sample(x0.expand(20000, 2, 2), t.expand(20000), torch.Generator().manual_seed(step))
        frequencies = torch.nn.functional.one_hot(draws, 4).float().mean(dim=0).permute(2, 0, 1)  # (2, 2, K) -> (K, 2, 2)
        torch.testing.assert_close(frequencies, marginals[0], atol=0.015, rtol=0)
    assert torch.equal(diffusion.sample(x0, torch.tensor([0])), x0)  # no noise at t = 0


def test_the_process_refuses_a_single_class():
    with pytest.raises(ValueError, match="at least 2 classes"):
        MaskDiffusion(num_classes=1, steps=10)


def test_the_denoiser_maps_any_image_size_to_class_logits():
    model = MaskDenoiser(condition_channels=5, num_classes=3, steps=10, width=16)
    for height, width in ((16, 16), (12, 20)):
        logits = model(torch.randn(2, 5, height, width), torch.randint(0, 3, (2, height, width)), torch.tensor([1, 10]))
        assert logits.shape == (2, 3, height, width) and logits.dtype == torch.float32
