"""DVC stage: the demo's learning curve, test mIoU against labeled training images, per feature source."""

import argparse
import logging
from pathlib import Path

from pipeline.config import load_params
from pipeline.evaluation.learning_curve import CurveSource, learning_curve, write_learning_curve
from pipeline.heads.selection_file import read_selection
from stages import output_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", nargs=4, action="append", required=True, metavar=("NAME", "TRAIN", "TEST", "FEATURES"),
                        help="FEATURES: a selection.json, `paper` (train.steps and train.blocks of params.yaml) or `all`")
    parser.add_argument("--out", required=True, help="the curve's JSON")
    parser.add_argument("--chart", required=True, help="its picture")
    parser.add_argument("--params", default="params.yaml")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    params = load_params(arguments.params)
    sources = {}
    for name, train, test, features in arguments.source:
        if features == "paper":
            steps, blocks = params.train.steps, params.train.blocks
        elif features == "all":
            steps, blocks = None, None
        else:
            steps, blocks = read_selection(features)
        sources[name] = CurveSource(Path(train), Path(test), steps, blocks)
    curve = learning_curve(sources, params.learning_curve, params.train)
    write_learning_curve(curve, output_path(arguments.out), output_path(arguments.chart))
    print("learning_curve: " + "; ".join(
        f"{name} " + ", ".join(f"{row['budget']}: {row['miou_mean']:.3f}" for row in source["by_budget"])
        for name, source in curve["sources"].items()))


if __name__ == "__main__":
    main()
