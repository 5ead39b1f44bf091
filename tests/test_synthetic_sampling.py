"""Sampling new images from a feature source's diffusion model (diffusers' schedulers)."""

import pytest
import torch

from pipeline.sources.diffusion_unet import load_unet_source
from pipeline.sources.tiny_unet import make_tiny_unet
from pipeline.synthetic.sampling import make_scheduler, sample_images, sample_seed, sample_space_of


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unet")
    make_tiny_unet(sample_size=16, seed=0).save_pretrained(folder)
    return sample_space_of(load_unet_source(folder, [], [0], 0, "cpu"), 16)


def generators(seed, indices):
    return [torch.Generator().manual_seed(sample_seed(seed, index)) for index in indices]


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samples_are_images_and_do_not_depend_on_their_batch(space, sampler):
    together = sample_images(space, sampler, 4, generators(0, [0, 1, 2]))
    alone = sample_images(space, sampler, 4, generators(0, [1]))
    assert together.shape == (3, 3, 16, 16) and together.min() >= -1 and together.max() <= 1
    torch.testing.assert_close(together[1:2], alone, atol=0.02, rtol=0)  # batched kernels round differently; steps amplify it
    assert not torch.allclose(together[0], together[1])


def test_other_seeds_give_other_samples(space):
    assert not torch.allclose(sample_images(space, "ddim", 3, generators(0, [0])), sample_images(space, "ddim", 3, generators(1, [0])))


def test_the_schedule_is_the_checkpoints_own(space):
    for sampler in ("ddpm", "ddim"):
        scheduler = make_scheduler(sampler, space.training_config, learned_variance=False)
        torch.testing.assert_close(scheduler.betas[[0, -1]], torch.tensor([1e-4, 0.02]))
        assert scheduler.config.num_train_timesteps == 1000 and scheduler.config.clip_sample
    assert make_scheduler("ddpm", space.training_config, learned_variance=True).config.variance_type == "learned_range"


def test_bad_steps_sizes_and_samplers_are_refused(space, tmp_path):
    with pytest.raises(ValueError, match="within 1..1000"):
        sample_images(space, "ddim", 0, generators(0, [0]))
    with pytest.raises(ValueError, match="unknown sampler"):
        make_scheduler("euler", space.training_config, False)
    make_tiny_unet(sample_size=16, seed=0).save_pretrained(tmp_path / "unet")
    with pytest.raises(ValueError, match="multiples of"):
        sample_space_of(load_unet_source(tmp_path / "unet", [], [0], 0, "cpu"), 18)
