"""DVC stage: generate the cartoon-face demo dataset (pool, few-shot train split, test split)."""

import argparse
import logging
import shutil

from pipeline.config import load_params
from pipeline.data.demo import write_demo_dataset
from stages import output_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--params", default="params.yaml")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    spec = load_params(arguments.params).demo
    out = output_path(arguments.out)
    shutil.rmtree(out, ignore_errors=True)  # this stage's own output: always generated whole
    write_demo_dataset(spec, out)
    print(f"demo data: {spec.train_images} train, {spec.test_images} test, {spec.pool_images} unlabeled faces in {out}")


if __name__ == "__main__":
    main()
