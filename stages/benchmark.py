"""DVC stage: run one benchmark preset end to end (presets/dvc.yaml) and write its report."""

import argparse
import logging
from pathlib import Path

from pipeline.benchmark import choose_preset, run_benchmark, summary_line
from pipeline.config import load_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="presets/params.yaml")
    parser.add_argument("--data", required=True, help="dataset root holding real/{train,test}/")
    parser.add_argument("--checkpoints", required=True, help="folder holding the preset's checkpoint file")
    parser.add_argument("--out", required=True)
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    params = load_params(arguments.params)
    settings = params.benchmark
    preset, overrides = choose_preset(
        settings.dataset, arguments.data, train_images=settings.train_images, test_images=settings.test_images
    )
    checkpoint = Path(arguments.checkpoints) / preset.checkpoint
    datasetddpm = (params.synthesize, params.segmenter) if settings.variant == "datasetddpm" else None
    report = run_benchmark(
        preset, arguments.data, checkpoint, arguments.out, params.extract, params.train, params.evaluate,
        settings.seeds, overrides, datasetddpm=datasetddpm,
    )
    print(summary_line(report))


if __name__ == "__main__":
    main()
