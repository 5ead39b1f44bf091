"""DVC stage: the segmenter distilled from the synthetic set, its best epoch chosen on the real
labeled training images (params.yaml's `segmenter`)."""

import argparse
import logging

from pipeline.config import load_params
from pipeline.heads.segmenter.training import train_segmenter
from stages import output_path, size_on_disk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", required=True)
    parser.add_argument("--validation", required=True, help="the real labeled training images")
    parser.add_argument("--out", required=True)
    parser.add_argument("--params", default="params.yaml")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    settings = load_params(arguments.params).segmenter
    summary = train_segmenter(arguments.images, output_path(arguments.out), settings, arguments.validation)
    print(
        f"train_segmenter: epoch {summary.chosen_epoch + 1} of {settings.epochs} kept (mIoU {summary.validation_miou} on "
        f"{arguments.validation}); saved to {arguments.out} ({size_on_disk(arguments.out)}) in {summary.seconds:.1f} s"
    )


if __name__ == "__main__":
    main()
