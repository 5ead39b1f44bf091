"""DVC stage: the demo's few-shot benchmark: every fold's committed DiffewS model (1 and 5 shots)
beside prototype matching, the MLP ensemble on the support and DiffewS from random weights, on
the same episodes of the test faces (`pipeline.fewshot.benchmark`)."""

import argparse
import logging
import time

from pipeline.config import load_params
from pipeline.fewshot.benchmark import benchmark_fewshot
from stages import output_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", required=True, help="pretrained/fold-F and random-init/fold-F model folders")
    parser.add_argument("--checkpoint", required=True, help="the diffusion model the baselines read")
    parser.add_argument("--images", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--shots", default="1,5", help="comma-separated support counts of the DiffewS models")
    parser.add_argument("--params", default="params.yaml")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    settings = load_params(arguments.params).fewshot
    started = time.perf_counter()
    shots = [int(count) for count in arguments.shots.split(",")]
    summary = benchmark_fewshot(arguments.models, arguments.checkpoint, arguments.images, output_path(arguments.out),
                                settings, shots, show_progress=False)
    print(f"fewshot: {summary['metrics']} over {len(summary['folds'])} folds, {settings.episodes} episodes each; "
          f"written to {arguments.out} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
