"""DVC stage: choose steps and taps of the training store from its labeled images alone."""

import argparse
import logging

from pipeline.config import load_params
from pipeline.heads.selection import select_into_folder
from stages import output_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--params", default="params.yaml")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    selection = select_into_folder(arguments.store, output_path(arguments.out), load_params(arguments.params).select)
    print(
        f"select: steps {selection.steps}, taps {selection.taps}, validation mIoU {selection.validation_miou:.3f} "
        f"({selection.folds} folds) into {arguments.out}"
    )


if __name__ == "__main__":
    main()
