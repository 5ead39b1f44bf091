"""Issue 27: the distilled segmenter against extract + ensemble at test time, side by side.

- paper shape: the paper's ADM-256 (random weights: cost needs no information) read at blocks
  5, 6, 7, 8, 12 at steps 50/150/250, with a 10-member ensemble on the 8448 features (34
  classes, the paper's (256, 128) members), against the segmenter (params.yaml's: MONAI UNet
  of its width, 34 classes) at 256²; both predict the same generated images, interleaved image by image, after one untimed
  image (`pipeline.synthetic.speed.seconds_per_image`);
- demo size: the committed demo DDPM with the headline ensemble and the demo's segmenter
  (data/models/segmenter-synthetic, from `dvc repro`) on the demo's test faces; skipped when
  `dvc repro` has not made them.

One thread each (params.yaml's evaluate.threads). Results: bench/results/segmenter_speed.json.

    python -m bench.segmenter_speed [--quick] [--images 3]
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bench.common import PAPER_CLASSES, PAPER_LAYOUT, PAPER_SIZE, PAPER_STEPS, PROJECT_ROOT, command_line, write_result
from bench.extraction_gpu_rate import generated_images
from pipeline.config import load_params
from pipeline.data.folders import list_images
from pipeline.heads.pixel_ensemble.ensemble import Ensemble, make_pixel_classifier, paper_hidden_widths
from pipeline.heads.segmenter.architectures import build_network
from pipeline.heads.segmenter.segmenter import Segmenter
from pipeline.prediction import ensemble_predictor, segmenter_predictor
from pipeline.runtime.devices import torch_threads
from pipeline.sources.checkpoints import Backbone, plain_config
from pipeline.sources.diffusion_unet import UNetSource
from pipeline.sources.tiny_unet import make_tiny_unet
from pipeline.store.schema import FeatureDescription
from pipeline.synthetic.speed import measure_speedup, seconds_per_image

DEMO = PROJECT_ROOT / "data"


def paper_shape(scratch: Path, quick: bool, images: int) -> dict:
    """Seconds per image of both paths on random-weight models of the paper's shape (tiny with --quick)."""
    from diffusers import UNet2DModel

    from pipeline.sources.adm.convert import adm_unet_config

    torch.manual_seed(0)
    size, blocks = (32, [2, 3, 5]) if quick else (PAPER_SIZE, [5, 6, 7, 8, 12])
    unet = make_tiny_unet(32) if quick else UNet2DModel.from_config(adm_unet_config(PAPER_LAYOUT) | {"sample_size": 256})
    backbone = Backbone(unet=unet.eval(), checkpoint_sha256="0" * 64, architecture=plain_config(unet.config),
                        source_format="diffusers")
    source = UNetSource(backbone, blocks, PAPER_STEPS, 0, torch.device("cpu"))
    feature_dim = sum(shape.channels for shape in source.tap_shapes(size)) * len(PAPER_STEPS)
    generator = torch.Generator().manual_seed(0)
    members = [make_pixel_classifier(feature_dim, PAPER_CLASSES, generator, paper_hidden_widths(PAPER_CLASSES)).eval()
               for _ in range(10)]
    features = FeatureDescription(source=source.provenance(), steps=PAPER_STEPS, taps=source.taps, image_size=size,
                                  feature_dim=feature_dim)
    ensemble = Ensemble(members, feature_dim, [f"class_{k}" for k in range(PAPER_CLASSES)], 255, features, [])
    width = load_params(PROJECT_ROOT / "params.yaml").segmenter.width
    network = build_network("unet", PAPER_CLASSES, width=width).eval()
    segmenter = Segmenter(network, "unet", ensemble.class_names, 255, size, {})
    records = list_images(generated_images(scratch / "segmenter-speed-images", images + 1, size))
    with torch_threads(1):
        seconds = seconds_per_image({"features_and_ensemble": ensemble_predictor(ensemble, source),
                                     "segmenter": segmenter_predictor(segmenter)}, records)
    return {"size": size, "feature_dim": feature_dim, "classes": PAPER_CLASSES, "members": 10, "segmenter_width": width,
            "images": images,
            "threads": 1, "seconds_per_image": {name: round(value, 4) for name, value in seconds.items()},
            "speedup": round(seconds["features_and_ensemble"] / seconds["segmenter"], 1)}


def run(quick: bool, scratch: Path, images: int = 3) -> dict:
    result = {"what": "seconds per image: extract + ensemble vs the segmenter distilled from synthetic samples"}
    result["paper shape (ADM-256, 8448-d, 34 classes)" if not quick else "tiny shape"] = paper_shape(scratch, quick, images)
    demo_models = [DEMO / "models" / "ensemble-ddpm", DEMO / "models" / "segmenter-synthetic", DEMO / "demo" / "real" / "test"]
    if quick or not all(path.exists() for path in demo_models):
        result["demo"] = "skipped: run `dvc repro` first" if not quick else "skipped: --quick"
    else:
        result["demo"] = measure_speedup(DEMO / "checkpoints" / "demo_ddpm", *demo_models, device="cpu", threads=1)
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    arguments, scratch = command_line(__doc__.splitlines()[0])
    write_result("segmenter_speed", run(arguments.quick, scratch))


if __name__ == "__main__":
    main()
