"""Stable Diffusion-family folders as a feature source, on a tiny random model the test builds."""

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import AutoTokenizer, CLIPTextModel

from cli import main
from conftest import write_image_folder
from pipeline.config import ExtractSettings
from pipeline.data.folders import list_images, load_image
from pipeline.sources.latent import LatentSource, is_latent_diffusion_folder, load_latent_diffusion
from pipeline.sources.loading import load_source, load_source_for
from pipeline.sources.tiny_unet import make_tiny_unet, save_tiny_latent_diffusion, save_tiny_text_encoder
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


@pytest.fixture(scope="module")
def prompted_folder(tmp_path_factory):
    """The tiny SD folder with a tiny CLIP text encoder (width 32, the UNet's cross-attention) and
    tokenizer, built offline."""
    return save_tiny_latent_diffusion(tmp_path_factory.mktemp("prompted") / "sd", seed=0, with_text_encoder=True)


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
    config_path = folder / "unet" / "config.json"
    original = config_path.read_text()
    config_path.write_text(json.dumps({**json.loads(original), "addition_embed_type": "text_time"}))  # as SD-XL's
    with pytest.raises(ValueError, match="needs added conditioning.*SD-XL"):
        load_latent_diffusion(folder, prompt_embeds=wide)
    config_path.write_text(original)
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
    # DatasetDDPM on a latent model: latents sampled with the prompt, decoded, labeled by the ensemble.
    invoke("synthesize", "--checkpoint", root / "sd", "--ensemble", root / "ensemble", "--count", 2, "--sampler", "ddim",
           "--sampling-steps", 2, "--filter-fraction", 0, "--out", root / "synthetic", "--device", "cpu",
           "--prompt-embeds", root / "embeds.safetensors")
    samples = list_images(root / "synthetic")
    assert len(samples) == 2 and np.load(samples[0].label_path).shape == (64, 64)


def _test_images(workspace):
    return torch.from_numpy(np.stack([load_image(record, 64) for record in list_images(workspace / "data" / "test")]))


def _encode_directly(folder, token_ids):
    """transformers' CLIP text encoder on given token ids: (1, len(token_ids), D)."""
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch.float32).eval()
    with torch.no_grad():
        return text_encoder(torch.tensor([token_ids]))[0]


def test_a_prompt_is_encoded_padded_to_the_tokenizer_length(prompted_folder):
    tokenizer = AutoTokenizer.from_pretrained(prompted_folder / "tokenizer")
    start, end, a, cat = tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>", "a</w>", "cat</w>"])
    # As diffusers' StableDiffusionPipeline: 77 tokens, padded with <|endoftext|> (SD 1.x's pad token).
    padded = [start, a, cat, end] + [end] * 73
    model = load_latent_diffusion(prompted_folder, prompt="a cat")
    assert model.prompt == "a cat" and model.prompt_embeds.shape == (1, 77, 32)
    assert model.prompt_embeds.dtype == torch.float32
    torch.testing.assert_close(model.prompt_embeds, _encode_directly(prompted_folder, padded), rtol=0, atol=0)
    provenance = LatentSource(model, [], [0], 0, torch.device("cpu")).provenance()
    assert provenance["prompt"] == "a cat"
    other = LatentSource(load_latent_diffusion(prompted_folder, prompt="a dog"), [], [0], 0, torch.device("cpu"))
    assert other.provenance()["prompt_embeds_sha256"] != provenance["prompt_embeds_sha256"]
    # A prompt longer than the encoder is truncated to 77 tokens (the last one <|endoftext|>).
    long = load_latent_diffusion(prompted_folder, prompt="a cat " * 60).prompt_embeds
    torch.testing.assert_close(long, _encode_directly(prompted_folder, [start] + [a, cat] * 37 + [a, end]), rtol=0, atol=0)


def test_a_half_precision_text_encoder_runs_in_float32(prompted_folder, tmp_path):
    folder = shutil.copytree(prompted_folder, tmp_path / "sd")
    CLIPTextModel.from_pretrained(folder / "text_encoder").half().save_pretrained(folder / "text_encoder")
    embeds = load_latent_diffusion(folder, prompt="a cat").prompt_embeds
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    ids = tokenizer("a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert embeds.dtype == torch.float32
    torch.testing.assert_close(embeds, _encode_directly(folder, ids), rtol=0, atol=0)


def test_a_text_encoder_that_does_not_fit_the_unet_is_refused(prompted_folder, tmp_path):
    folder = shutil.copytree(prompted_folder, tmp_path / "sd")
    shutil.rmtree(folder / "text_encoder")
    save_tiny_text_encoder(folder, hidden_size=48)
    with pytest.raises(ValueError, match=r"sd/text_encoder gives prompt embeddings of width 48, but .*sd/unet's "
                                         r"cross-attention takes 32: the text encoder"):
        load_latent_diffusion(folder, prompt="a cat")
    shutil.rmtree(folder / "tokenizer")
    with pytest.raises(ValueError, match="has text_encoder/ but no tokenizer/.*--prompt-embeds"):
        load_latent_diffusion(folder, prompt="a cat")


def test_predict_re_encodes_the_recorded_prompt(prompted_folder, latent_workspace):
    settings = ExtractSettings(steps=[261], blocks=TAPS, seed=3, size=64, device="cpu", prompt="a cat")
    source = load_source(prompted_folder, settings)
    images = _test_images(latent_workspace)
    maps = source.feature_maps(images)
    reference = _reference_features(prompted_folder, source.model.prompt_embeds, images, 261, 3, TAPS)
    for name in TAPS:
        relative = (maps[name][:, 0] - reference[name]).norm() / reference[name].norm()
        assert relative < 1e-4, (name, relative)
    provenance = source.provenance()
    rebuilt = load_source_for(prompted_folder, provenance, [261], TAPS, "cpu")
    assert rebuilt.provenance() == provenance and rebuilt.model.prompt == "a cat"
    with pytest.raises(ValueError, match="prompt embeddings differ.*'a dog'"):
        load_source_for(prompted_folder, provenance | {"prompt": "a dog"}, [261], TAPS, "cpu")
