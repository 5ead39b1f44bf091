"""The pixel-space UNet feature source: taps by block number or module path, early stop, provenance."""

import pytest
import torch

from pipeline.sources.adm.blocks import decoder_block_names
from pipeline.sources.checkpoints import Backbone
from pipeline.sources.diffusion_unet import UNetSource, list_taps, resolve_taps
from pipeline.sources.noise import add_noise, paper_scheduler, shared_noise
from pipeline.sources.tiny_unet import make_tiny_unet


def _source(blocks, steps=(100,), seed=0):
    unet = make_tiny_unet(sample_size=32, seed=1)
    backbone = Backbone(unet, "ab" * 32, dict(unet.config), "diffusers")
    return UNetSource(backbone, blocks, steps, seed, torch.device("cpu"))


def test_block_numbers_are_aliases_of_module_paths():
    unet = make_tiny_unet(sample_size=32, seed=1)
    names = decoder_block_names(unet)
    assert resolve_taps(unet, [5, "12", "mid_block", names[3]]) == [names[5], names[12], "mid_block", names[3]]
    assert resolve_taps(unet, ["decoder"]) == names and resolve_taps(unet, ["mid_block", "decoder"])[1:] == names
    with pytest.raises(ValueError, match=r"decoder block 40 is invalid.*0\.\.14"):
        resolve_taps(unet, [40])
    with pytest.raises(ValueError, match="'up_blocks.9' is neither"):
        resolve_taps(unet, ["up_blocks.9"])
    with pytest.raises(ValueError, match="more than once"):
        resolve_taps(unet, [5, names[5]])


def test_feature_maps_equal_a_full_forward_pass_stopped_after_the_last_tap():
    source = _source([12, 5, "mid_block"], steps=(100, 300), seed=4)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    maps = source.feature_maps(images)
    for position, step in enumerate((100, 300)):
        full = {}
        handles = [
            source.unet.get_submodule(name).register_forward_hook(lambda _m, _i, out, name=name: full.update({name: out}))
            for name in source.taps
        ]
        with torch.no_grad():
            noisy = add_noise(images, step, shared_noise(4, (1, 3, 32, 32)), paper_scheduler())
            source.unet(noisy, torch.full((2,), step))
        for handle in handles:
            handle.remove()
        for name in source.taps:
            torch.testing.assert_close(maps[name][:, position], full[name])


def test_features_over_several_noise_draws_are_the_mean_of_single_draws():
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    averaged = _source([5], steps=(200,), seed=3).feature_maps(images)
    single = [_source([5], steps=(200,), seed=seed).feature_maps(images) for seed in (3, 4)]
    averaged_two = UNetSource(_source([]).backbone, [5], [200], 3, torch.device("cpu"), noise_draws=2).feature_maps(images)
    name = averaged.popitem()[0]
    torch.testing.assert_close(averaged_two[name], (single[0][name] + single[1][name]) / 2)


def test_shapes_and_provenance():
    source = _source([5, 12], steps=(50, 150, 250), seed=7)
    shapes = source.tap_shapes(32)
    assert [shape.name for shape in shapes] == source.taps
    maps = source.feature_maps(torch.zeros(1, 3, 32, 32))
    for shape in shapes:
        assert maps[shape.name].shape == (1, 3, shape.channels, shape.height, shape.width)
    assert source.provenance() == {
        "kind": "diffusers", "checkpoint_sha256": "ab" * 32, "architecture": dict(source.unet.config), "noise_seed": 7,
        "noise_draws": 1,
    }


def test_list_taps_names_every_single_use_module_with_its_shape_and_block_number():
    source = _source([])
    taps = {tap["name"]: tap for tap in list_taps(source.unet, lambda: source.probe(32))}
    names = decoder_block_names(source.unet)
    assert [taps[name]["block"] for name in names] == list(range(len(names)))
    assert taps["mid_block"]["block"] is None and taps["conv_in"]["height"] == 32
    source = _source([5, "mid_block"])
    for shape in source.tap_shapes(32):
        assert (taps[shape.name]["channels"], taps[shape.name]["height"]) == (shape.channels, shape.height)
    # A module run several times per pass (the resnets' shared activation) has no single output.
    assert not any(name.endswith("nonlinearity") for name in taps)
