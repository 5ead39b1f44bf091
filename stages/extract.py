"""DVC stage: extract one split's features into a store (resumes; replaces a store of other settings)."""

import argparse
import logging

from pipeline.config import load_params
from pipeline.data.folders import find_class_info
from pipeline.extraction.extract import extract_features
from stages import loaded_code_sha256, output_path, size_on_disk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--images", required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--params", default="params.yaml")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    settings = load_params(arguments.params).extract
    summary = extract_features(
        arguments.checkpoint,
        arguments.images,
        output_path(arguments.store),
        settings,
        classes=find_class_info(arguments.images),
        replace_mismatched=True,  # the store is this stage's output: new settings mean a new store
        code_sha256=loaded_code_sha256(),  # and new code too (a killed run of the same code resumes)
    )
    print(
        f"extract: {summary.images_written} of {summary.images_total} images written to {summary.store_path} "
        f"({summary.feature_dim} features per pixel, {size_on_disk(summary.store_path)}) in {summary.seconds:.1f} s "
        f"on {summary.device}"
    )


if __name__ == "__main__":
    main()
