"""Store size and extraction time per image at the paper's settings, both layouts.

Builds the paper's 256×256 ADM architecture (guided-diffusion flags of ffhq.pt / lsun_*.pt:
num_channels 256, channel_mult 1,1,2,2,4,4, attention at 32,16,8, learn_sigma) with random
weights in diffusers format, extracts steps 50/150/250 and blocks 5,6,7,8,12 of a few real
images (../shared ffhq_34 test images when present, else generated ones) into a native and a
dense store, and records bytes per image and seconds per image in bench/results/store_size.json.

Random weights make activations that compress differently from a trained model's: the
uncompressed sizes are exact, the compression ratios are indicative only.

    python -m bench.store_size [--images 2] [--device auto]   (or as part of `python -m bench`)
"""

import argparse
import json
import platform
import shutil
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DModel
from PIL import Image

from bench.common import PAPER_LAYOUT, write_result
from pipeline.config import ExtractSettings
from pipeline.extraction.extract import extract_features
from pipeline.sources.adm.convert import adm_unet_config
from pipeline.store.reader import FeatureStore
from pipeline.store.schema import tap_array

PROJECT_ROOT = Path(__file__).resolve().parents[1]
FFHQ_TEST = PROJECT_ROOT.parent / "shared" / "datasets" / "ddpm-seg" / "ffhq_34" / "real" / "test"


def prepare_images(folder: Path, count: int) -> str:
    folder.mkdir(parents=True)
    if FFHQ_TEST.is_dir():
        for path in sorted(FFHQ_TEST.glob("*.png"))[:count]:
            shutil.copy(path, folder / path.name)
        return f"first {count} ffhq_34 test images"
    rng = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    return f"{count} random-noise images"


def run(quick: bool, scratch: Path, images: int = 2, device: str = "auto") -> dict:
    """Bytes and seconds per image at the paper's size (skipped in quick mode: it builds a
    552 M-parameter model and takes minutes per image on a CPU)."""
    if quick:
        return {"skipped": "quick mode"}
    scratch = scratch / "store-size"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    torch.manual_seed(0)
    unet = UNet2DModel.from_config(adm_unet_config(PAPER_LAYOUT) | {"sample_size": 256})
    unet.save_pretrained(scratch / "adm256")
    parameters = sum(p.numel() for p in unet.parameters())
    del unet
    source = prepare_images(scratch / "images", images)
    results = {"parameters": parameters, "images": source, "machine": platform.processor() or platform.machine(), "layouts": {}}
    for layout in ("native", "dense"):
        settings = ExtractSettings(layout=layout, batch_size=1, device=device)
        summary = extract_features(scratch / "adm256", scratch / "images", scratch / f"{layout}.zarr", settings)
        store = FeatureStore(scratch / f"{layout}.zarr")
        names = ["pixels"] if layout == "dense" else [tap_array(tap) for tap in store.schema.taps]
        raw = sum(store.group[name].nbytes for name in names) / store.num_images
        stored = sum(
            path.stat().st_size for name in names for path in (store.path / name).rglob("*") if path.is_file()
        ) / store.num_images
        results["layouts"][layout] = {
            "feature_dim": summary.feature_dim,
            "raw_fp16_bytes_per_image": raw,
            "stored_bytes_per_image": stored,
            "compression_ratio": raw / stored,
            "seconds_per_image": summary.seconds / summary.images_total,
            "device": summary.device,
        }
        print(layout, json.dumps(results["layouts"][layout]), flush=True)
        shutil.rmtree(store.path)
    shutil.rmtree(scratch)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--scratch", default=str(PROJECT_ROOT / "runs" / "bench-scratch"))
    arguments = parser.parse_args()
    print(write_result("store_size", run(False, Path(arguments.scratch), arguments.images, arguments.device)))


if __name__ == "__main__":
    main()
