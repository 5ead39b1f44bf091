"""DVC stage: a small UNet for the demo, with random weights, in diffusers format.

A placeholder backbone until a DDPM trained on the demo's unlabeled pool replaces it.
"""

import argparse
from pathlib import Path

from pipeline.backbones import make_tiny_unet
from pipeline.config import load_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--params", default="params.yaml")
    arguments = parser.parse_args()

    spec = load_params(arguments.params).demo
    unet = make_tiny_unet(sample_size=spec.size, seed=spec.seed)
    unet.save_pretrained(Path(arguments.out))
    print(f"demo model: {sum(p.numel() for p in unet.parameters()):,} parameters saved to {arguments.out}")


if __name__ == "__main__":
    main()
