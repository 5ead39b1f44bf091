"""DVC stage: train the mask-prior refiner of an ensemble on its training store."""

import argparse
import logging

from pipeline.config import load_params
from pipeline.refine.training import train_refiner
from stages import output_path, size_on_disk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ensemble", required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--params", default="params.yaml")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    params = load_params(arguments.params)
    summary = train_refiner(arguments.ensemble, arguments.store, output_path(arguments.out), params.refine, params.train)
    print(
        f"refine_train: refiner on {summary.images} images (first predictions: mIoU {summary.first_prediction_miou}, "
        f"{params.refine.first_prediction}) saved to {summary.refiner_dir} ({size_on_disk(summary.refiner_dir)}) "
        f"in {summary.seconds:.1f} s"
    )


if __name__ == "__main__":
    main()
