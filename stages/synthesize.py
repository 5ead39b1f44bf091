"""DVC stage: DatasetDDPM's synthetic set: samples of the DDPM labeled by the headline ensemble,
the most uncertain dropped (params.yaml's `synthesize`)."""

import argparse
import logging
import time

from pipeline.config import load_params
from pipeline.synthetic.synthesize import synthesize_dataset
from stages import loaded_code_sha256, output_path, size_on_disk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--ensemble", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--params", default="params.yaml")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    settings = load_params(arguments.params).synthesize
    started = time.perf_counter()
    # The folder persists between runs (a stopped run resumes); one made by other code or settings is replaced.
    summary = synthesize_dataset(arguments.checkpoint, arguments.ensemble, output_path(arguments.out), settings,
                                 code_sha256=loaded_code_sha256(), replace_mismatched=True)
    print(
        f"synthesize: {summary.samples} samples ({summary.sampled_now} drawn now), {summary.kept} kept, "
        f"{settings.sampler} with {settings.sampling_steps} steps; written to {arguments.out} "
        f"({size_on_disk(arguments.out)}) in {time.perf_counter() - started:.1f} s"
    )


if __name__ == "__main__":
    main()
