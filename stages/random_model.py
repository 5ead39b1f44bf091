"""DVC stage: the baseline UNet — the demo DDPM's architecture with random weights."""

import argparse

from pipeline.config import load_params
from pipeline.sources.checkpoints import load_backbone, randomly_initialised_unet
from stages import output_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--like", required=True, help="the trained checkpoint whose architecture to copy")
    parser.add_argument("--out", required=True)
    parser.add_argument("--params", default="params.yaml")
    arguments = parser.parse_args()

    settings = load_params(arguments.params).baselines
    trained = load_backbone(arguments.like)
    unet = randomly_initialised_unet(trained.architecture, settings.random_weights_seed)
    unet.save_pretrained(output_path(arguments.out))
    print(f"random model: {trained.source_format} architecture of {arguments.like}, seed {settings.random_weights_seed}, saved to {arguments.out}")


if __name__ == "__main__":
    main()
