"""Issue 17.3: latent-diffusion extraction runs at ≥ 90 % of the bare VAE-encode + UNet forwards'
throughput (the goal the pixel-space ADM path reaches in `extraction_overhead`).

For the same images, steps, taps, batch size and device, three things are timed side by side
(repeats interleaved, median taken):

- bare: on the preloaded images, per batch the VAE encode (posterior mean × scaling factor) and,
  per step, the noising and the UNet forward stopped once the last tap has fired, under the same
  autocast as extraction, with no hooks copying anything off the device and no VAE slicing;
- bare, full forward: the same with the whole UNet forward (for reference);
- extract: the whole extract stage (`extract_features`: image hashing and loading, loading the
  folder and the prompt embeddings, the tap-shape probe, the forwards with hooks, float16
  conversion, compression, checksums, done marks) into a fresh native store.

Model: a Stable Diffusion 1.x-shaped folder built here with random weights, about 1/5 of SD's
width: VAE (32, 64, 128, 128), f = 8, so 256×256 images → 4×32×32 latents; UNet (64, 128, 256,
256) with cross-attention (width 64, 77 prompt tokens) in three levels, 34 M parameters; taps
up_blocks.1 and up_blocks.2 (DIFT's tap is SD's up_blocks.1), so up_blocks.3 never runs. On a
CPU thread the encode and the stopped forward take about 0.2 s per image, so they dominate as
on real models; images are cat_15's training images (cycled to the count), or generated ones
without ../shared. Quick mode: `save_tiny_latent_diffusion` at 64×64 on 4 generated images.

On a GPU, give it more images so the fixed costs of a run (loading, probing) are amortised as
in a real extraction:

    python -m bench --only latent_extraction
    python -m bench.latent_extraction [--quick] [--images 24] [--repeats 5]   # e.g. --images 512 on a GPU
"""

from __future__ import annotations

import shutil
import statistics
import time
from itertools import cycle, islice
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from safetensors.torch import save_file

from bench.common import SHARED, command_line, extraction_timings, write_result
from bench.extraction_overhead import extract_seconds
from pipeline.config import ExtractSettings
from pipeline.data.folders import list_images, load_example
from pipeline.runtime.devices import autocast_for, pick_device
from pipeline.sources.diffusion_unet import resolve_taps
from pipeline.sources.hooks import capture_outputs, run_until_captured
from pipeline.sources.latent import load_latent_diffusion
from pipeline.sources.noise import add_noise, shared_noise
from pipeline.sources.tiny_unet import save_tiny_latent_diffusion
from pipeline.store.reader import FeatureStore

CAT_TRAIN = SHARED / "datasets" / "ddpm-seg" / "cat_15" / "real" / "train"
MB = 1e6

# Stable Diffusion 1.x's structure at about 1/5 of its width (SD: 320, 640, 1280, 1280; VAE 128-512).
BENCH_UNET = dict(
    block_out_channels=(64, 128, 256, 256), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=64, attention_head_dim=8,
)
BENCH_VAE = dict(
    block_out_channels=[32, 64, 128, 128], layers_per_block=1, in_channels=3, out_channels=3, latent_channels=4,
    sample_size=256, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    scaling_factor=0.18215,
)
PROMPT_TOKENS = 77  # CLIP's padded length, as SD's pipeline encodes a prompt


def save_bench_latent_diffusion(folder: Path, seed: int = 0) -> Path:
    """The benchmark's SD-shaped folder (unet/, vae/, scheduler/) with random weights; the global
    random state is left untouched."""
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet, vae = UNet2DConditionModel(**BENCH_UNET), AutoencoderKL(**BENCH_VAE)
    finally:
        torch.random.set_rng_state(generator_state)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").save_pretrained(folder / "scheduler")
    return folder


def prepare_inputs(scratch: Path, quick: bool, count: int) -> tuple[Path, Path, ExtractSettings]:
    """(latent-diffusion folder, image folder, settings) for the measurement."""
    images, folder, embeds = scratch / "latent-images", scratch / "latent-sd", scratch / "latent-prompt.safetensors"
    for path in (images, folder):
        shutil.rmtree(path, ignore_errors=True)
    images.mkdir(parents=True)
    if quick:
        save_tiny_latent_diffusion(folder, seed=0)
        size, blocks, width = 64, ["up_blocks.0", "up_blocks.1"], 32
    else:
        save_bench_latent_diffusion(folder, seed=0)
        size, blocks, width = 256, ["up_blocks.1", "up_blocks.2"], BENCH_UNET["cross_attention_dim"]
    originals = sorted(CAT_TRAIN.glob("*.png")) if CAT_TRAIN.is_dir() and not quick else []
    if originals:  # the same pictures under new names when more are asked for than there are
        for index, path in enumerate(islice(cycle(originals), count)):
            shutil.copy(path, images / f"{index:04d}_{path.name}")
    else:
        rng = np.random.default_rng(0)
        for index in range(count):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(images / f"{index:04d}.png")
    prompt = torch.randn(1, PROMPT_TOKENS, width, generator=torch.Generator().manual_seed(5))
    save_file({"prompt_embeds": prompt}, embeds)
    settings = ExtractSettings(
        steps=[261], blocks=blocks, size=size, batch_size=4, device="auto", prompt_embeds=str(embeds)
    )
    return folder, images, settings


def bare_forwards(folder: Path, images_dir: Path, settings: ExtractSettings, truncated: bool) -> float:
    """Seconds for the VAE encodes and UNet forwards alone over every image and step (inputs on
    the device beforehand; one untimed batch first, as extraction's tap-shape probe warms up too)."""
    device = pick_device(settings.device)
    model = load_latent_diffusion(folder, prompt_embeds=settings.prompt_embeds)
    unet, vae = model.unet.to(device), model.vae.to(device)
    images = np.stack([load_example(record, settings.size)[0] for record in list_images(images_dir)])
    batches = [torch.from_numpy(images[start : start + settings.batch_size]).to(device)
               for start in range(0, len(images), settings.batch_size)]
    taps = {name: unet.get_submodule(name) for name in resolve_taps(unet, settings.blocks)} if truncated else {}
    latent_side = settings.size // 2 ** (len(vae.config.block_out_channels) - 1)
    noise = shared_noise(settings.seed, (1, vae.config.latent_channels, latent_side, latent_side)).to(device)
    prompt = model.prompt_embeds.to(device)

    def forwards(batches: list[torch.Tensor]) -> None:
        for batch in batches:
            with autocast_for(device):
                latents = vae.encode(batch).latent_dist.mean.float() * vae.config.scaling_factor
            for step in settings.steps:
                timesteps = torch.full((len(batch),), step, dtype=torch.long, device=device)
                outputs.clear()
                with autocast_for(device):
                    run_until_captured(unet, add_noise(latents, step, noise, model.scheduler), timesteps,
                                       encoder_hidden_states=prompt.expand(len(batch), -1, -1))

    with torch.inference_mode(), capture_outputs(taps, stop_when_all_captured=truncated) as outputs:
        forwards(batches[:1])
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        forwards(batches)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - started


def store_megabytes_per_image(store: Path, count: int) -> dict:
    """The float16 features of one image (what the taps hold, uncompressed) and the store's disk
    bytes per image (features, image, labels and checksums, compressed), in MB."""
    schema = FeatureStore(store).schema
    raw = 2 * schema.maps_per_tap * sum(shape.channels * shape.height * shape.width for shape in schema.tap_shapes)
    return {
        "features_float16": round(raw / MB, 4),
        "on_disk": round(FeatureStore(store).disk_bytes() / count / MB, 4),
        "taps": {shape.name: [shape.channels, shape.height, shape.width] for shape in schema.tap_shapes},
    }


def run(quick: bool, scratch: Path, count: int = 24, repeats: int = 5) -> dict:
    torch.set_num_threads(1)
    count, repeats = (4, 1) if quick else (count, repeats)
    scratch.mkdir(parents=True, exist_ok=True)
    folder, images, settings = prepare_inputs(scratch, quick, count)
    store = scratch / "latent-extract.zarr"
    times = {"bare_truncated": [], "bare_full": [], "extract": []}
    for _ in range(repeats):  # interleaved, so slow phases of the machine hit every variant
        times["bare_truncated"].append(bare_forwards(folder, images, settings, truncated=True))
        times["bare_full"].append(bare_forwards(folder, images, settings, truncated=False))
        times["extract"].append(extract_seconds(folder, images, store, settings))
        megabytes = store_megabytes_per_image(store, count)
        shutil.rmtree(store)
        print({name: round(values[-1], 2) for name, values in times.items()}, flush=True)
    throughput = {name: count / statistics.median(values) for name, values in times.items()}
    ratio = throughput["extract"] / throughput["bare_truncated"]
    return {
        "what": "latent-diffusion extract-stage images/s vs bare VAE encode + UNet forwards' images/s, "
                "same images, steps, taps, batch and device",
        "model": "tiny SD (save_tiny_latent_diffusion)" if quick else "SD 1.x shape at ~1/5 width, random weights",
        "unet_parameters": sum(parameter.numel() for parameter in UNet2DConditionModel.from_pretrained(folder / "unet").parameters()),
        **extraction_timings(settings, str(pick_device(settings.device)), count, repeats, times),
        "store_megabytes_per_image": megabytes,
        "ratios": {
            "extract_vs_bare": round(ratio, 3),
            "extract_vs_bare_full_forward": round(throughput["extract"] / throughput["bare_full"], 3),
        },
        "targets": {"extract >= 90 % of bare VAE encode + UNet forwards": ratio >= 0.9},
    }


def main() -> None:
    def options(parser):
        parser.add_argument("--images", type=int, default=24)
        parser.add_argument("--repeats", type=int, default=5)

    arguments, scratch = command_line(__doc__, add_options=options)
    print(write_result("latent_extraction", run(arguments.quick, scratch, arguments.images, arguments.repeats)))


if __name__ == "__main__":
    main()
