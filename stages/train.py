"""DVC stage: train the ensemble on the training store: on params.yaml's `train.steps` and
`train.blocks` of it, on a `select` stage's choice (`--selection`), or on all of it (`--all-taps`)."""

import argparse
import dataclasses
import json
import logging
import os
from pathlib import Path

from pipeline.config import load_params
from pipeline.heads.pixel_ensemble.training import train_on_store
from pipeline.heads.selection_file import read_selection
from pipeline.pictures.figures import save_training_curves, training_curve_rows
from stages import output_path, size_on_disk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--log", required=True, help="training curve JSON (DVC plot)")
    parser.add_argument("--chart", required=True, help="training curve PNG")
    parser.add_argument("--params", default="params.yaml")
    taps = parser.add_mutually_exclusive_group()
    taps.add_argument("--selection", help="a selection.json written by `select`: train on its steps and taps")
    taps.add_argument("--all-taps", action="store_true", help="train on every step and tap of the store")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    settings = load_params(arguments.params).train
    if arguments.selection:
        steps, taps = read_selection(arguments.selection)
        settings = dataclasses.replace(settings, steps=steps, blocks=taps)
    elif arguments.all_taps:
        settings = dataclasses.replace(settings, steps=None, blocks=None)
    out, curve_path, chart_path = output_path(arguments.out), output_path(arguments.log), output_path(arguments.chart)
    ensemble, summary = train_on_store(arguments.store, out, settings)
    losses_per_member = [log.epoch_mean_loss for log in ensemble.logs]
    curve_path.parent.mkdir(parents=True, exist_ok=True)
    staged = curve_path.with_name(curve_path.name + ".tmp")
    staged.write_text(json.dumps(training_curve_rows(losses_per_member), indent=1))
    os.replace(staged, curve_path)  # a kill leaves the old curve or the new one, never half a file
    save_training_curves(chart_path, losses_per_member, f"training loss per member ({Path(arguments.store).name})")
    print(
        f"train: {len(summary.epochs_per_member)} members on {summary.training_pixels} pixels "
        f"(epochs {summary.epochs_per_member}) saved to {summary.ensemble_dir} "
        f"({size_on_disk(summary.ensemble_dir)}) in {summary.seconds:.1f} s"
    )


if __name__ == "__main__":
    main()
