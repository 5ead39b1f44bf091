"""DVC stage: segment the test store's images into a predictions folder (`predictions.zarr`, which a
later stage may refine), score them (`metrics.json`) and draw masks and pictures."""

import argparse
import logging
import time

from pipeline.config import load_params
from pipeline.evaluation.evaluate import evaluate_on_store
from stages import output_path, size_on_disk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ensemble", required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--params", default="params.yaml")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    settings = load_params(arguments.params).evaluate
    started = time.perf_counter()
    metrics = evaluate_on_store(arguments.ensemble, arguments.store, output_path(arguments.out), settings)
    print(
        f"evaluate: {metrics['images']} images, mIoU {metrics['miou']}; written to {arguments.out} "
        f"({size_on_disk(arguments.out)}) in {time.perf_counter() - started:.1f} s"
    )


if __name__ == "__main__":
    main()
