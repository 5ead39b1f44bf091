"""DVC stage: the raw-pixel baseline's features of one split."""

import argparse
import logging

from pipeline.config import load_params
from pipeline.data.folders import find_class_info
from pipeline.extraction.pixels import extract_pixel_features
from stages import loaded_code_sha256, output_path, size_on_disk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--params", default="params.yaml")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    params = load_params(arguments.params)
    summary = extract_pixel_features(
        arguments.images,
        output_path(arguments.store),
        params.extract.size,
        params.baselines.pixel_neighbourhood,
        classes=find_class_info(arguments.images),
        replace_mismatched=True,
        code_sha256=loaded_code_sha256(),
    )
    print(
        f"pixel features: {summary.images_written} of {summary.images_total} images to {summary.store_path} "
        f"({size_on_disk(summary.store_path)}) in {summary.seconds:.1f} s"
    )


if __name__ == "__main__":
    main()
