"""DVC stage: seconds per test image of the segmenter and of extract + ensemble, side by side."""

import argparse
import json

from pipeline.config import load_params
from pipeline.runtime.atomic import replaced_file
from pipeline.synthetic.speed import measure_speedup
from stages import output_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--ensemble", required=True)
    parser.add_argument("--segmenter", required=True)
    parser.add_argument("--images", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--params", default="params.yaml")
    arguments = parser.parse_args()

    threads = load_params(arguments.params).evaluate.threads or 1
    result = measure_speedup(arguments.checkpoint, arguments.ensemble, arguments.segmenter, arguments.images,
                             device="cpu", threads=threads)
    with replaced_file(output_path(arguments.out)) as staging:
        staging.write_text(json.dumps(result, indent=1))
    print(f"synthetic_speed: {json.dumps(result)}")


if __name__ == "__main__":
    main()
