"""DVC stage: refine an ensemble's stored predictions of the test store, then score and draw them."""

import argparse
import logging
import time

from pipeline.config import load_params
from pipeline.refine.refining import refine_on_store
from stages import output_path, size_on_disk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--refiner", required=True)
    parser.add_argument("--predictions", required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--params", default="params.yaml")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    params = load_params(arguments.params)
    started = time.perf_counter()
    metrics = refine_on_store(arguments.refiner, arguments.predictions, arguments.store, output_path(arguments.out),
                              params.refine, params.evaluate)
    print(
        f"refine: {metrics['images']} images, mIoU {metrics['miou']}; written to {arguments.out} "
        f"({size_on_disk(arguments.out)}) in {time.perf_counter() - started:.1f} s"
    )


if __name__ == "__main__":
    main()
