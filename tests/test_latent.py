"""Stable Diffusion-family folders as a feature source, on a tiny random model the test builds."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import save_file

from cli import main
from conftest import write_image_folder
from pipeline.config import ExtractSettings
from pipeline.data.folders import list_images, load_image
from pipeline.sources.latent import LatentSource, is_latent_diffusion_folder, load_latent_diffusion
from pipeline.sources.loading import load_source
from pipeline.sources.tiny_unet import make_tiny_unet, save_tiny_latent_diffusion
from pipeline.store.bilinear import upsample_and_concatenate

TAPS = ["up_blocks.0", "up_blocks.1"]


@pytest.fixture(scope="module")
def latent_workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent")
    save_tiny_latent_diffusion(root / "sd", seed=0)
    save_file({"prompt_embeds": torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(5))}, root / "embeds.safetensors")
    for split, count, seed in (("train", 3, 0), ("test", 2, 1)):
        write_image_folder(root / "data" / split, count=count, size=64, seed=seed)
    (root / "data" / "classes.json").write_text(json.dumps({"names": ["background", "disc", "square"], "ignore_label": 255}))
    return root


def _reference_features(folder, embeds, images, step, seed, taps):
    """The contract computed with diffusers directly: VAE mean × scaling factor, the folder's
    scheduler's add_noise, the UNet with forward hooks on the taps."""
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
    captured = {}
    handles = [unet.get_submodule(name).register_forward_hook(
        lambda _m, _i, out, name=name: captured.update({name: out[0] if isinstance(out, tuple) else out}))
        for name in taps]
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
        noise = torch.randn((1, *latents.shape[1:]), generator=torch.Generator().manual_seed(seed))
        noisy = scheduler.add_noise(latents, noise.expand_as(latents), torch.full((len(images),), step))
        unet(noisy, torch.full((len(images),), step), encoder_hidden_states=embeds.expand(len(images), -1, -1))
    for handle in handles:
        handle.remove()
    return captured


def test_a_folder_is_told_apart_from_a_pixel_unet(latent_workspace, tmp_path):
    make_tiny_unet().save_pretrained(tmp_path / "pixel_unet")
    assert is_latent_diffusion_folder(latent_workspace / "sd")
    assert not is_latent_diffusion_folder(tmp_path / "pixel_unet") and not is_latent_diffusion_folder(tmp_path)


def test_features_follow_the_contract(latent_workspace):
    folder, embeds_file = latent_workspace / "sd", latent_workspace / "embeds.safetensors"
    settings = ExtractSettings(steps=[261], blocks=TAPS, seed=3, size=64, device="cpu", prompt_embeds=str(embeds_file))
    source = load_source(folder, settings)
    assert isinstance(source, LatentSource)
    images = torch.from_numpy(np.stack([load_image(record, 64) for record in list_images(latent_workspace / "data" / "test")]))
    maps = source.feature_maps(images)
    embeds = load_latent_diffusion(folder, prompt_embeds=embeds_file).prompt_embeds
    reference = _reference_features(folder, embeds, images, 261, 3, TAPS)
    for name in TAPS:
        relative = (maps[name][:, 0] - reference[name]).norm() / reference[name].norm()
        assert relative < 1e-4, (name, relative)
    shapes = {shape.name: shape for shape in source.tap_shapes(64)}
    assert (shapes["up_blocks.0"].channels, shapes["up_blocks.0"].height) == (64, 32)
    provenance = source.provenance()
    assert provenance["kind"] == "latent-diffusion" and provenance["prompt"] is None and provenance["noise_draws"] == 1


def test_noise_draws_average_the_features(latent_workspace):
    folder = latent_workspace / "sd"
    images = torch.zeros(1, 3, 64, 64)
    model = load_latent_diffusion(folder, prompt_embeds=latent_workspace / "embeds.safetensors")
    cpu = torch.device("cpu")
    single = [LatentSource(model, ["up_blocks.1"], [500], seed, cpu).feature_maps(images)["up_blocks.1"] for seed in (3, 4)]
    both = LatentSource(model, ["up_blocks.1"], [500], 3, cpu, noise_draws=2).feature_maps(images)["up_blocks.1"]
    torch.testing.assert_close(both, (single[0] + single[1]) / 2)


def test_broken_folders_are_refused_naming_the_part(latent_workspace, tmp_path):
    import shutil

    folder = shutil.copytree(latent_workspace / "sd", tmp_path / "sd")
    with pytest.raises(ValueError, match="no text_encoder/.*--prompt-embeds"):
        load_latent_diffusion(folder)
    wide = tmp_path / "wide.npy"
    np.save(wide, np.zeros((1, 7, 48), np.float32))
    with pytest.raises(ValueError, match=r"wide.npy gives prompt embeddings of width 48.*takes 32"):
        load_latent_diffusion(folder, prompt_embeds=wide)
    with pytest.raises(ValueError, match="--prompt and --prompt-embeds apply to latent-diffusion folders"):
        pixel = tmp_path / "pixel_unet"
        make_tiny_unet().save_pretrained(pixel)
        load_source(pixel, ExtractSettings(prompt="a cat", device="cpu"))
    shutil.rmtree(folder / "vae")
    with pytest.raises(ValueError, match="missing vae/"):
        load_latent_diffusion(folder, prompt_embeds=wide)


def test_extract_inspect_train_evaluate_through_the_cli(latent_workspace):
    root = latent_workspace

    def invoke(*arguments):
        result = CliRunner().invoke(main, ["--quiet", *map(str, arguments)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result

    common = ["--checkpoint", root / "sd", "--steps", "261", "--blocks", ",".join(TAPS), "--size", 64, "--seed", 3,
              "--prompt-embeds", root / "embeds.safetensors", "--device", "cpu"]
    for split in ("train", "test"):
        invoke("extract", *common, "--images", root / "data" / split, "--store", root / f"{split}.zarr")
    # One pixel's features from the store equal the contract's, upsampled bilinearly to 64×64.
    vector = json.loads(invoke("inspect", "--store", root / "test.zarr", "--image", 0, "--pixel", 17, 40, "--json").output)
    images = torch.from_numpy(load_image(list_images(root / "data" / "test")[0], 64))[None]
    embeds = load_latent_diffusion(root / "sd", prompt_embeds=root / "embeds.safetensors").prompt_embeds
    reference = _reference_features(root / "sd", embeds, images, 261, 3, TAPS)
    expected = upsample_and_concatenate([reference[name] for name in TAPS], 64)[0, 17, 40].numpy()
    found = np.array(vector["features"])
    assert np.linalg.norm(found - expected) / np.linalg.norm(expected) < 2e-2
    taps = json.loads(invoke("inspect", "--checkpoint", root / "sd", "--taps", "--json").output)
    assert {"up_blocks.0", "up_blocks.0.attentions.1", "mid_block"} <= {tap["name"] for tap in taps}
    invoke("train", "--store", root / "train.zarr", "--out", root / "ensemble", "--members", 2, "--max-epochs", 3)
    invoke("evaluate", "--ensemble", root / "ensemble", "--store", root / "test.zarr", "--out", root / "results")
    assert json.loads((root / "results" / "metrics.json").read_text())["miou"] >= 0
    invoke("predict", "--ensemble", root / "ensemble", "--checkpoint", root / "sd", "--images", root / "data" / "test",
           "--out", root / "predicted", "--prompt-embeds", root / "embeds.safetensors")
    assert (root / "predicted" / "img_000.npy").is_file()
