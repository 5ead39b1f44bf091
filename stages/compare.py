"""DVC stage: the demo's headline metrics, DDPM features beside the baselines."""

import argparse
from pathlib import Path

from pipeline.evaluation.compare import write_comparison
from stages import output_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ddpm", required=True, help="metrics.json of the DDPM features (the selected taps)")
    parser.add_argument("--ddpm-paper-taps", help="metrics.json of the DDPM features at the paper's taps")
    parser.add_argument("--ddpm-refined", help="metrics.json of the DDPM features' predictions after refinement")
    parser.add_argument("--random", required=True, help="metrics.json of the random-weights UNet")
    parser.add_argument("--pixels", required=True, help="metrics.json of the raw pixels")
    parser.add_argument("--synthetic", help="metrics.json of the segmenter trained on synthetic samples (DatasetDDPM)")
    parser.add_argument("--synthetic-speed", help="its speed against extract + ensemble (synthetic_speed's JSON)")
    parser.add_argument("--fewshot", help="the few-shot benchmark's metrics.json (its headline numbers join)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--chart", required=True)
    parser.add_argument("--per-class", help="where to write every class's IoU by feature source")
    arguments = parser.parse_args()

    paths = {"ddpm": Path(arguments.ddpm)}
    if arguments.ddpm_refined:
        paths["ddpm_refined"] = Path(arguments.ddpm_refined)
    if arguments.ddpm_paper_taps:
        paths["ddpm_paper_taps"] = Path(arguments.ddpm_paper_taps)
    paths |= {"random": Path(arguments.random), "pixels": Path(arguments.pixels)}
    if arguments.synthetic:
        paths["synthetic"] = Path(arguments.synthetic)
    per_class = output_path(arguments.per_class) if arguments.per_class else None
    speed = Path(arguments.synthetic_speed) if arguments.synthetic_speed else None
    fewshot = Path(arguments.fewshot) if arguments.fewshot else None
    summary = write_comparison(paths, output_path(arguments.out), output_path(arguments.chart), per_class, speed,
                               fewshot)
    print("compare: " + ", ".join(f"{key} {value}" for key, value in summary.items()))


if __name__ == "__main__":
    main()
