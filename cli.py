"""segcache command line: extract features once, train and evaluate many times, inspect offline.

    python cli.py --help
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

import click

from pipeline.config import (
    EvaluateSettings,
    ExtractSettings,
    FewShotSettings,
    RefineSettings,
    SegmenterSettings,
    SynthesizeSettings,
    TrainSettings,
)
from pipeline.data.folders import find_class_info, load_class_info
from pipeline.sizes import describe as describe_size
from pipeline.sizes import parse_size


def _tap_list(text: str) -> list[int | str]:
    """"5,6,up_blocks.2.attentions.0" → [5, 6, "up_blocks.2.attentions.0"]: block numbers or module paths."""
    return [int(part) if part.strip().isdigit() else part.strip() for part in text.split(",") if part.strip()]


def _chosen_features(steps: str | None, blocks: str | None, selection: Path | None):
    """(steps, taps) of --steps/--blocks or of a --selection file (None: all the store holds)."""
    if selection is None:
        return _int_list(steps) if steps else None, _tap_list(blocks) if blocks else None
    if steps or blocks:
        raise click.UsageError("give --selection or --steps/--blocks, not both")
    from pipeline.heads.selection_file import read_selection

    return read_selection(selection)


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None


class _Context:
    def __init__(self, verbose: bool, quiet: bool):
        self.verbose = verbose
        self.show_progress = not quiet and sys.stderr.isatty()


def _run(context: _Context, action):
    """Runs a command; expected failures become a short message and exit code 1."""
    try:
        return action()
    except (ValueError, FileNotFoundError, OSError) as error:
        if context.verbose:
            raise
        raise click.ClickException(str(error)) from None


@click.group()
@click.option("--verbose", "-v", is_flag=True, help="Debug logging and full tracebacks.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.pass_context
def main(click_context: click.Context, verbose: bool, quiet: bool) -> None:
    """Label-efficient segmentation with diffusion features, cached on disk."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    click_context.obj = _Context(verbose, quiet)


@main.command()
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path),
              help="guided-diffusion .pt/.safetensors, a diffusers UNet folder, or a Stable Diffusion-family folder.")
@click.option("--images", required=True, type=click.Path(path_type=Path), help="Folder of PNG/JPEG images (+ same-stem .npy labels).")
@click.option("--store", required=True, help="Feature store to create or complete: a folder or a URL (s3://…, gs://…).")
@click.option("--steps", default="50,150,250", show_default=True, help="Diffusion steps, comma-separated.")
@click.option("--blocks", default="5,6,7,8,12", show_default=True,
              help="Taps: guided-diffusion decoder block numbers and/or UNet module paths (up_blocks.1.attentions.0).")
@click.option("--seed", default=0, show_default=True, help="Seed of the shared noise.")
@click.option("--size", default="256", show_default=True,
              help="Model input size: S (images resized to S×S) or H,W (rows, columns), e.g. 360,480.")
@click.option("--resize", help="Instead of --size, keep the images' aspect ratio: shorter:N or longer:N (the other side "
                               "rounded to the model's multiple), e.g. shorter:256.")
@click.option("--layout", type=click.Choice(["native", "dense"]), default="native", show_default=True)
@click.option("--batch-size", default=4, show_default=True, help="Images per forward pass.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, mps…")
@click.option("--codec", type=click.Choice(["blosc-lz4", "zstd", "none"]), default=ExtractSettings.codec, show_default=True,
              help="Chunk compression: none (native float16 features barely compress), zstd to archive a dense store.")
@click.option("--classes", type=click.Path(path_type=Path), help="classes.json (default: found beside the images).")
@click.option("--scheduler", help="Dask scheduler address (tcp://host:8786): its workers run the batches.")
@click.option("--noise-draws", default=1, show_default=True, help="Average the features over this many noise draws (seed + k).")
@click.option("--prompt", default="", help="Latent diffusion: the prompt, encoded by the folder's text encoder.")
@click.option("--prompt-embeds", type=click.Path(path_type=Path), help="Latent diffusion: a (1, L, D) .safetensors/.npy in place of --prompt.")
@click.option("--coco", type=click.Path(path_type=Path),
              help="COCO JSON (e.g. exported by a labeling tool): its masks are the labels of the images it lists; "
                   "finished images with new labels are relabeled, their features kept.")
@click.pass_obj
def extract(context: _Context, checkpoint, images, store, steps, blocks, seed, size, resize, layout, batch_size, device,
            codec, classes, scheduler, noise_draws, prompt, prompt_embeds, coco):
    """Extract pixel features of a folder of images into a store (resumes unfinished work)."""
    from pipeline.extraction.extract import extract_features

    def action():
        settings = ExtractSettings(
            steps=_int_list(steps), blocks=_tap_list(blocks), seed=seed, size=parse_size(size), resize=resize,
            layout=layout, batch_size=batch_size, device=device, codec=codec, scheduler=scheduler,
            noise_draws=noise_draws, prompt=prompt, prompt_embeds=None if prompt_embeds is None else str(prompt_embeds),
        )
        class_info = load_class_info(classes) if classes else find_class_info(images)
        summary = extract_features(checkpoint, images, store, settings, class_info, show_progress=context.show_progress,
                                   coco=coco)
        other_shapes = (f"; {summary.images_of_other_shapes} images of another aspect ratio were resized to it"
                        if summary.images_of_other_shapes else "")
        click.echo(
            f"extract: {summary.images_written} of {summary.images_total} images written to {summary.store_path} "
            f"at {describe_size(summary.image_shape)} ({summary.feature_dim} features per pixel) in "
            f"{summary.seconds:.1f} s on {summary.device}{other_shapes}"
        )

    _run(context, action)


def _default(settings_class, name: str):
    """A settings dataclass field's default: an option's default read from `pipeline/config.py`,
    so that the command line and params.yaml's documented defaults cannot drift apart."""
    field = next(field for field in dataclasses.fields(settings_class) if field.name == name)
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def _train_option(name: str, **click_arguments):
    """`--<name>` for the TrainSettings field `name`, with its dataclass default."""
    return click.option(f"--{name.replace('_', '-')}", name, default=_default(TrainSettings, name), show_default=True,
                        **click_arguments)


@main.command()
@click.option("--store", required=True, help="Feature store of the training images (a folder or a URL).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for the trained ensemble.")
@_train_option("protocol", type=click.Choice(["paper", "fast"]), help="paper: as the official code; fast: members batched together, 1.5 passes and at least 400 steps (faster, can be a little less accurate).")
@_train_option("members", help="MLPs in the ensemble.")
@_train_option("hidden_widths", help="Each member's two hidden widths, comma-separated (default: the paper's, 128,32 below 30 classes, 256,128 from 30).")
@_train_option("steps", help="Train on these of the store's steps only, comma-separated (default: all).")
@_train_option("blocks", help="Train on these of the store's taps only: names or block numbers, comma-separated (default: all).")
@_train_option("seed", help="Seeds initialisation and every member's pixel order.")
@_train_option("learning_rate", help="Adam's learning rate (paper protocol).")
@_train_option("batch_size", help="Pixels per optimiser step (paper protocol).")
@_train_option("max_epochs", help="Upper bound on epochs per member (paper protocol).")
@_train_option("patience", help="Stop a member after more than this many iterations in a row without a new best batch loss.")
@_train_option("patience_from_epoch", help="The patience count starts at this epoch index (the paper: epoch > 3).")
@_train_option("min_class_pixels", type=int, help="Per image, a class with fewer labeled pixels is ignored (default: the paper's 20 at 256×256, scaled with the image area).")
@_train_option("buffer_pixels", help="Pixels gathered from the store at a time (bounds memory).")
@_train_option("cache_megabytes", help="RAM for the native feature tables kept between buffers.")
@_train_option("device", help="auto, cpu, cuda, cuda:1, mps…")
@_train_option("threads", help="torch CPU threads (0: torch's default); raise it on a machine kept to this job.")
@_train_option("scheduler", help="Dask scheduler address: its workers read the features; the ensemble trains here.")
@_train_option("fast_batch_size", help="Fast protocol: pixels per member and step.")
@_train_option("fast_learning_rate", help="Fast protocol: Adam's initial learning rate (decays linearly to 0).")
@_train_option("fast_epochs", help="Fast protocol: passes over the labeled pixels (may be fractional).")
@_train_option("fast_min_steps", help="Fast protocol: at least this many steps, however few the pixels.")
@click.option("--classes", type=click.Path(path_type=Path), help="classes.json (default: recorded in the store).")
@click.option("--selection", type=click.Path(path_type=Path), help="A selection.json written by `select`: its steps and taps.")
@click.pass_obj
def train(context: _Context, store, out, classes, selection, steps, blocks, hidden_widths, **settings_options):
    """Train the MLP ensemble on the labeled pixels of a store (the paper's protocol by default).

    \f
    Every field of TrainSettings (params.yaml's `train`) is an option of the same name (a test
    checks it); `settings_options` holds those that need no conversion.
    """
    from pipeline.heads.pixel_ensemble.training import train_on_store

    def action():
        chosen_steps, chosen_taps = _chosen_features(steps, blocks, selection)
        settings = TrainSettings(
            steps=chosen_steps or None, blocks=chosen_taps,
            hidden_widths=_int_list(hidden_widths) if hidden_widths else None, **settings_options,
        )
        class_info = load_class_info(classes) if classes else None
        _, summary = train_on_store(store, out, settings, class_info, context.show_progress)
        click.echo(
            f"train: {len(summary.epochs_per_member)} members on {summary.training_pixels} pixels "
            f"(epochs {summary.epochs_per_member}) saved to {summary.ensemble_dir} in {summary.seconds:.1f} s"
        )

    _run(context, action)


@main.command()
@click.option("--ensemble", required=True, type=click.Path(path_type=Path), help="Folder of a trained ensemble, or of a segmenter (train-segmenter).")
@click.option("--store", required=True, help="Feature store of the test images (a folder or a URL).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for masks, pictures and metrics.json.")
@click.pass_obj
def evaluate(context: _Context, ensemble, store, out):
    """Segment the images of a store and score them against their labels."""
    from pipeline.evaluation.evaluate import evaluate_on_store

    def action():
        metrics = evaluate_on_store(ensemble, store, out, EvaluateSettings(), context.show_progress)
        click.echo(
            f"evaluate: {metrics['images']} images, mIoU {metrics['miou']}, pixel accuracy "
            f"{metrics['pixel_accuracy']}; written to {out}"
        )

    _run(context, action)


@main.command()
@click.option("--store", required=True, help="Feature store of the labeled training images (may hold many steps and taps).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for selection.json and selection.png.")
@click.option("--classes", type=click.Path(path_type=Path), help="classes.json (default: recorded in the store).")
@click.option("--folds", default=5, show_default=True, help="Cross-validation folds over the labeled images.")
@click.option("--pixels-per-image", default=500, show_default=True, help="Labeled pixels sampled from each image.")
@click.option("--min-gain", default=0.2, show_default=True, help="Stop adding when validation mIoU rises by no more points than this.")
@click.option("--max-features", type=int, help="Never choose more features per pixel than this.")
@click.option("--steps", help="Comma-separated: choose among these of the store's steps only (default: all).")
@click.option("--blocks", help="Comma-separated: choose among these of the store's taps only (names or block numbers; default: all).")
@click.option("--memory-gigabytes", default=4.0, show_default=True,
              help="The exact probe where it fits in this much memory, else one on each (step, tap)'s principal components.")
@click.option("--components", default=32, show_default=True, help="Principal components per (step, tap) in that reduced probe.")
@click.pass_obj
def select(context: _Context, store, out, classes, folds, pixels_per_image, min_gain, max_features, steps, blocks,
           memory_gigabytes, components):
    """Choose steps and taps of a store from its labeled images alone (k-fold cross-validation of a cheap probe)."""
    from pipeline.config import SelectSettings
    from pipeline.heads.selection import select_cost, select_into_folder

    def action():
        settings = SelectSettings(folds=folds, pixels_per_image=pixels_per_image, min_gain_points=min_gain,
                                  max_features=max_features, steps=_int_list(steps) if steps else None,
                                  blocks=_tap_list(blocks) if blocks else None, memory_gigabytes=memory_gigabytes,
                                  components=components)
        cost = select_cost(store, settings)
        probe = ("the exact probe" if cost["probe"] == "exact" else
                 f"a probe on {cost['probe_features']} principal components (the exact one would not fit in "
                 f"{memory_gigabytes:g} GB)")
        click.echo(f"select: {cost['candidates']} candidates, {cost['features_per_pixel']} features per pixel, up to "
                   f"{cost['pixels']} pixels, {probe}: up to {cost['bytes'] / 1e9:.2f} GB of memory, about "
                   + (f"{cost['seconds']:.0f} s" if cost["seconds"] < 120 else f"{cost['seconds'] / 60:.0f} min")
                   + " to read and fit before the greedy search", err=True)
        class_info = load_class_info(classes) if classes else None
        chosen = select_into_folder(store, out, settings, class_info, context.show_progress)
        click.echo(
            f"select: steps {chosen.steps}, taps {chosen.taps} (validation mIoU {chosen.validation_miou:.3f} over "
            f"{chosen.folds} folds); {out / 'selection.json'}, {out / 'selection.png'}"
        )

    _run(context, action)


@main.command("refine-train")
@click.option("--ensemble", required=True, type=click.Path(path_type=Path), help="Folder of the trained ensemble to refine.")
@click.option("--store", required=True, help="Feature store of its labeled training images.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for the trained refiner.")
@click.option("--first-prediction", type=click.Choice(["in_fold", "out_of_fold"]), default="in_fold", show_default=True,
              help="What the refiner learns to fix: the ensemble's own predictions of its training images, or those of ensembles that never saw them (k folds; costs k trainings).")
@click.option("--folds", default=5, show_default=True, help="Out-of-fold ensembles (each trained as `train` does).")
@click.option("--members", default=10, show_default=True, help="Members of each out-of-fold ensemble.")
@click.option("--projection-dims", default=16, show_default=True, help="Principal components of the features it sees (0: none).")
@click.option("--iterations", default=2000, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--threads", default=_default(RefineSettings, "threads"), show_default=True,
              help="torch CPU threads of the refiner and the out-of-fold ensembles (0: torch's default).")
@click.pass_obj
def refine_train(context: _Context, ensemble, store, out, first_prediction, folds, members, projection_dims, iterations,
                 seed, device, threads):
    """Train a mask-prior refiner (DDPS) that learns to fix an ensemble's mistakes on its labeled images."""
    from pipeline.refine.training import train_refiner

    def action():
        settings = RefineSettings(folds=folds, first_prediction=first_prediction, projection_dims=projection_dims,
                                  iterations=iterations, seed=seed, device=device, threads=threads)
        ensembles = TrainSettings(members=members, seed=seed, device=device, threads=threads)
        summary = train_refiner(ensemble, store, out, settings, ensembles, context.show_progress)
        click.echo(f"refine-train: refiner on {summary.images} images (their first predictions: mIoU "
                   f"{summary.first_prediction_miou}) saved to {summary.refiner_dir} in {summary.seconds:.1f} s")

    _run(context, action)


@main.command()
@click.option("--refiner", required=True, type=click.Path(path_type=Path), help="Folder of a trained refiner.")
@click.option("--predictions", required=True, type=click.Path(path_type=Path), help="A predictions.zarr written by `evaluate`.")
@click.option("--store", required=True, help="The feature store those predictions were made from.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for the refined predictions, masks, pictures, metrics.json.")
@click.option("--schedule", default="5,3,1", show_default=True, help="Re-noising steps, descending, comma-separated.")
@click.option("--seed", default=0, show_default=True)
@click.pass_obj
def refine(context: _Context, refiner, predictions, store, out, schedule, seed):
    """Refine an ensemble's stored predictions with a trained refiner; score them where there are labels."""
    from pipeline.refine.refining import refine_on_store

    def action():
        settings = RefineSettings(schedule=_int_list(schedule), seed=seed)
        metrics = refine_on_store(refiner, predictions, store, out, settings, EvaluateSettings(), context.show_progress)
        click.echo(f"refine: {metrics['images']} images, mIoU {metrics['miou']}; written to {out}")

    _run(context, action)


@main.command()
@click.option("--ensemble", required=True, type=click.Path(path_type=Path),
              help="Folder of a trained ensemble, or of a segmenter (train-segmenter: no checkpoint needed).")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="The checkpoint the ensemble's features came from.")
@click.option("--images", required=True, type=click.Path(path_type=Path), help="Folder of PNG/JPEG images, any size.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for masks, overlays and summary.json.")
@click.option("--device", default="auto", show_default=True)
@click.option("--pictures", default=6, show_default=True, help="Images in the overview figure predictions.png.")
@click.option("--prompt-embeds", type=click.Path(path_type=Path), help="Latent diffusion: the file the features were extracted with.")
@click.option("--format", "formats", type=click.Choice(["png", "coco"]), multiple=True,
              help="Also write pre-annotations for labeling tools: png, an index PNG per image (<name>_labels.png); "
                   "coco, annotations.json with RLE masks (extract --coco reads it back). Repeatable.")
@click.pass_obj
def predict(context: _Context, ensemble, checkpoint, images, out, device, pictures, prompt_embeds, formats):
    """Segment new images (no labels needed) with a trained ensemble or segmenter."""
    from pipeline.prediction import predict_folder

    def action():
        summary = predict_folder(
            ensemble, checkpoint, images, out, device=device, show_progress=context.show_progress, pictures=pictures,
            prompt_embeds=prompt_embeds, formats=formats,
        )
        click.echo(f"predict: {summary.images} images segmented into {summary.out_dir} in {summary.seconds:.1f} s")

    _run(context, action)


@main.command("learning-curve")
@click.option("--train", "train_store", required=True, help="Feature store of the labeled training images.")
@click.option("--test", "test_store", required=True, help="Feature store of labeled test images (the same features).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for learning_curve.json and learning_curve.png.")
@click.option("--budgets", default="1,2,5,10,20", show_default=True, help="Numbers of labeled training images, comma-separated.")
@click.option("--draws", default=3, show_default=True, help="Draws of which images per budget.")
@click.option("--members", default=10, show_default=True, help="Members of each ensemble.")
@click.option("--protocol", type=click.Choice(["paper", "fast"]), default="fast", show_default=True)
@click.option("--seed", default=0, show_default=True, help="Seeds the draws.")
@click.option("--steps", help="These of the stores' steps only, comma-separated (default: all).")
@click.option("--blocks", help="These of the stores' taps only: names or block numbers (default: all).")
@click.option("--selection", type=click.Path(path_type=Path), help="A selection.json written by `select`: its steps and taps.")
@click.option("--device", default="auto", show_default=True)
@click.pass_obj
def learning_curve_command(context: _Context, train_store, test_store, out, budgets, draws, members, protocol, seed,
                           steps, blocks, selection, device):
    """How many labeled images are enough: test mIoU of ensembles trained on 1, 2, 5… of them."""
    from pipeline.config import LearningCurveSettings
    from pipeline.evaluation.learning_curve import CurveSource, learning_curve, write_learning_curve

    def action():
        chosen_steps, chosen_taps = _chosen_features(steps, blocks, selection)
        settings = LearningCurveSettings(budgets=_int_list(budgets), draws=draws, seed=seed, members=members,
                                         protocol=protocol)
        source = CurveSource(Path(train_store), Path(test_store), chosen_steps or None, chosen_taps)
        curve = learning_curve({"features": source}, settings, TrainSettings(device=device, threads=1),
                               context.show_progress)
        out.mkdir(parents=True, exist_ok=True)
        write_learning_curve(curve, out / "learning_curve.json", out / "learning_curve.png")
        rows = curve["sources"]["features"]["by_budget"]
        click.echo("learning-curve: " + ", ".join(f"{row['budget']} images {row['miou_mean']:.3f} ± {row['miou_std']:.3f}"
                                                  for row in rows) + f"; {out / 'learning_curve.png'}")

    _run(context, action)


@main.command()
@click.option("--ensemble", required=True, type=click.Path(path_type=Path), help="Folder of the trained ensemble.")
@click.option("--store", required=True, help="Feature store of the unlabeled images to choose from (same features as the ensemble's).")
@click.option("--count", required=True, type=int, help="How many images to suggest for labeling.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for ranking.json, suggestions.png and pre-annotations.")
@click.option("--strategy", type=click.Choice(["uncertainty", "diverse", "random"]), default="diverse", show_default=True,
              help="uncertainty: the most uncertain; diverse: uncertain and spread over the images' content; random: a baseline.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random strategy.")
@click.option("--format", "formats", type=click.Choice(["png", "coco"]), multiple=True,
              help="Pre-annotations of the chosen images for labeling tools (as predict --format). Repeatable.")
@click.pass_obj
def suggest(context: _Context, ensemble, store, count, out, strategy, seed, formats):
    """Rank unlabeled images for labeling next by the ensemble's uncertainty; write their predicted masks."""
    from pipeline.suggestion import suggest_images

    def action():
        suggestion = suggest_images(ensemble, store, out, count, strategy, seed, formats, context.show_progress)
        click.echo(f"suggest: label next {', '.join(suggestion.chosen)} ({strategy}, of {len(suggestion.uncertainty)} "
                   f"images); {out / 'ranking.json'}, {out / 'suggestions.png'}")

    _run(context, action)


@main.command()
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path), help="The diffusion model to sample from.")
@click.option("--ensemble", type=click.Path(path_type=Path), help="The ensemble that labels the samples (trained on this checkpoint's features).")
@click.option("--count", default=10000, show_default=True, help="Samples to draw (the official: 10,000).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for the labeled samples (completed if a run stopped).")
@click.option("--sampler", type=click.Choice(["ddpm", "ddim"]), default="ddpm", show_default=True, help="ddpm: ancestral (the official); ddim: η = 0.")
@click.option("--sampling-steps", default=1000, show_default=True, help="Denoising steps (the official: 1000).")
@click.option("--filter-fraction", default=0.1, show_default=True, help="Share of the samples dropped by the uncertainty filter.")
@click.option("--filter-lowest-fraction", default=0.003, show_default=True, help="Of which from the least uncertain end (the official 30 of 10,000).")
@click.option("--batch-size", default=16, show_default=True, help="Samples per batch (memory follows it).")
@click.option("--seed", default=0, show_default=True, help="Sample i draws its noise from generator (seed, i).")
@click.option("--device", default="auto", show_default=True)
@click.option("--unlabeled", is_flag=True, help="Samples only, for a person to annotate (the official variant): no ensemble, no filter.")
@click.option("--size", type=int, help="With --unlabeled: the samples' size (default: the model's).")
@click.option("--prompt-embeds", type=click.Path(path_type=Path), help="Latent diffusion: the file the features were extracted with.")
@click.option("--threads", default=_default(SynthesizeSettings, "threads"), show_default=True,
              help="torch CPU threads (0: torch's default); raise it on a machine kept to this job.")
@click.pass_obj
def synthesize(context: _Context, checkpoint, ensemble, count, out, sampler, sampling_steps, filter_fraction,
               filter_lowest_fraction, batch_size, seed, device, unlabeled, size, prompt_embeds, threads):
    """DatasetDDPM: sample images from the diffusion model, label them with the ensemble, drop the most uncertain."""
    from pipeline.synthetic.synthesize import synthesize_dataset

    def action():
        if unlabeled == (ensemble is not None):
            raise click.UsageError("give --ensemble to label the samples, or --unlabeled for samples only")
        settings = SynthesizeSettings(
            count=count, sampler=sampler, sampling_steps=sampling_steps, filter_fraction=filter_fraction,
            filter_lowest_fraction=min(filter_lowest_fraction, filter_fraction), batch_size=batch_size, seed=seed,
            device=device, threads=threads,
        )
        summary = synthesize_dataset(checkpoint, ensemble, out, settings, size, context.show_progress,
                                     prompt_embeds=prompt_embeds)
        click.echo(f"synthesize: {summary.samples} samples ({summary.sampled_now} drawn now), {summary.kept} kept "
                   f"in {summary.out_dir}")

    _run(context, action)


@main.command("train-segmenter")
@click.option("--images", required=True, type=click.Path(path_type=Path), help="Labeled image folder (e.g. synthesize's output).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for the segmenter (a stopped run there resumes).")
@click.option("--validation", type=click.Path(path_type=Path), help="Real labeled images: the epoch with the best mIoU on them is kept.")
@click.option("--architecture", type=click.Choice(["unet", "basic-unet", "deeplabv3-resnet101"]), default="unet", show_default=True,
              help="deeplabv3-resnet101: the paper's (needs torchvision and its ImageNet weights).")
@click.option("--width", default=16, show_default=True, help="The UNets' first-level channels (each level doubles them).")
@click.option("--epochs", default=20, show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--learning-rate", default=0.001, show_default=True)
@click.option("--image-size", type=int, help="Train at this size (default: the images' own).")
@click.option("--flips", is_flag=True, help="Mirror half of each batch left-right (not for classes with a left and a right).")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--threads", default=_default(SegmenterSettings, "threads"), show_default=True,
              help="torch CPU threads (0: torch's default); raise it on a machine kept to this job.")
@click.pass_obj
def train_segmenter(context: _Context, images, out, validation, architecture, width, epochs, batch_size, learning_rate,
                    image_size, flips, seed, device, threads):
    """Train a segmenter on labeled images (no diffusion model at test time); exported to ONNX too."""
    from pipeline.heads.segmenter.training import train_segmenter as train

    def action():
        settings = SegmenterSettings(architecture=architecture, width=width, epochs=epochs, batch_size=batch_size,
                                     learning_rate=learning_rate, image_size=image_size, flips=flips, seed=seed,
                                     device=device, threads=threads)
        summary = train(images, out, settings, validation, context.show_progress)
        score = "" if summary.validation_miou is None else f", validation mIoU {summary.validation_miou}"
        click.echo(f"train-segmenter: epoch {summary.chosen_epoch + 1} kept{score}; saved to {summary.out_dir} "
                   f"in {summary.seconds:.1f} s")

    _run(context, action)


def _names(listed: str | None) -> list[str] | None:
    """"ear, mouth" → ["ear", "mouth"]; None stays None."""
    return None if listed is None else [name.strip() for name in listed.split(",") if name.strip()]


def _fewshot_options(function):
    """The episode options the few-shot commands share."""
    options = [
        click.option("--preset", help="A few-shot benchmark's protocol (shipped: coco_20i, pascal_5i, lvis_92i): "
                     "its folds, layout, size, seed and episodes, unless given here; the images' classes.json is checked."),
        click.option("--folds", type=int, help="Classes split into this many folds (default 4, as COCO-20i)."),
        click.option("--fold", default=0, show_default=True, help="This fold's classes are the novel ones; training never sees them."),
        click.option("--novel-classes", help="Comma-separated names: the novel classes, a split of your own instead of --folds/--fold."),
        click.option("--image-size", type=int, help="Episodes at this size (default: the model's)."),
        click.option("--seed", type=int, help="Seeds the episodes (default 0)."),
        click.option("--device", default="auto", show_default=True),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _class_weights(pairs: tuple[str, ...]) -> dict[str, float]:
    """("eye=2", "nose=0.5") → {"eye": 2.0, "nose": 0.5}."""
    weights = {}
    for pair in pairs:
        name, separator, value = pair.rpartition("=")
        try:
            weights[name] = float(value)
        except ValueError:
            separator = ""
        if not separator or not name:
            raise click.BadParameter(f"expected NAME=WEIGHT, got {pair!r}", param_hint="--class-weight")
    return weights


def _fewshot_settings(images: Path, episode_options: dict, **values) -> FewShotSettings:
    """A few-shot command's settings: its options, over a preset's protocol when one is named (its
    classes.json checked against the preset), over the defaults."""
    options = dict(episode_options)
    preset_name, novel = options.pop("preset"), _names(options.pop("novel_classes"))
    chosen = {key: value for key, value in {**options, **values}.items() if value is not None}
    if preset_name is not None:
        from pipeline.data.folders import find_class_info
        from pipeline.data.presets import load_fewshot_preset

        preset = load_fewshot_preset(preset_name)
        classes = find_class_info(images)
        if classes is None:
            raise ValueError(f"{images}: no classes.json beside the images or above them; it names the classes")
        preset.check_dataset(classes, images)
        protocol = {"folds": preset.folds, "fold_layout": preset.fold_layout, "image_size": preset.image_size,
                    "seed": preset.seed, "episodes": preset.episodes}
        chosen = {**protocol, **chosen}
    return FewShotSettings(novel_classes=novel, **chosen)


@main.command("fewshot-train")
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path), help="A pixel-space UNet or a latent-diffusion folder.")
@click.option("--images", required=True, type=click.Path(path_type=Path), help="Labeled image folder (classes.json beside or above).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for the few-shot model (a stopped run there resumes).")
@_fewshot_options
@click.option("--steps", default=1000, show_default=True, help="Training steps.")
@click.option("--batch-size", default=4, show_default=True, help="Episodes per step.")
@click.option("--max-shots", default=1, show_default=True, help="Each step draws 1..this many supports.")
@click.option("--learning-rate", default=1e-5, show_default=True, help="AdamW's, decayed linearly to 0.")
@click.option("--prompt-embeds", type=click.Path(path_type=Path), help="Latent diffusion: the empty prompt's embedding, for folders without a text encoder.")
@click.option("--fine-attention", type=int, multiple=True, help="Pixel UNets: add KV-fused self-attention to the blocks at this side (repeatable, e.g. 16 and 8).")
@click.option("--trainable", type=click.Choice(["all", "attention"]), default="all", show_default=True,
              help="all: the whole UNet (the paper); attention: self-attention, support stem and output head only.")
@click.option("--random-init", is_flag=True, help="Fine-tune a randomly initialised copy of the UNet (the baseline of pretraining).")
@click.option("--class-weight", "class_weights", multiple=True, metavar="NAME=WEIGHT",
              help="Draw training episodes of this base class in proportion to WEIGHT (others 1; repeatable).")
@click.pass_obj
def fewshot_train(context: _Context, checkpoint, images, out, steps, batch_size, max_shots, learning_rate, prompt_embeds,
                  fine_attention, trainable, random_init, class_weights, **episode_options):
    """DiffewS: fine-tune the diffusion UNet to segment what a support mask shows (KV fusion), on the base classes."""
    from pipeline.fewshot.training import train_fewshot

    def action():
        settings = _fewshot_settings(images, episode_options, steps=steps, batch_size=batch_size,
                                     max_training_shots=max_shots, learning_rate=learning_rate,
                                     fine_attention=list(fine_attention), trainable=trainable, random_init=random_init,
                                     class_weights=_class_weights(class_weights))
        summary = train_fewshot(checkpoint, images, out, settings, context.show_progress, prompt_embeds=prompt_embeds)
        click.echo(f"fewshot-train: {summary.steps} steps, final loss {summary.final_loss:.4f}; saved to "
                   f"{summary.out_dir} in {summary.seconds:.1f} s")

    _run(context, action)


@main.command("fewshot-evaluate")
@click.option("--model", required=True, type=click.Path(path_type=Path), help="Folder of a model from fewshot-train.")
@click.option("--images", required=True, type=click.Path(path_type=Path), help="Labeled image folder to draw episodes from.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for metrics.json and episodes.png.")
@_fewshot_options
@click.option("--shots", default=1, show_default=True, help="Supports per episode.")
@click.option("--episodes", type=int, help="Episodes (default: the preset's, else 1,000 per fold, the official).")
@click.option("--threshold", default=0.25, show_default=True, help="Foreground above this fraction of the map's maximum.")
@click.option("--classes", "class_set", type=click.Choice(["test", "train"]), default="test", show_default=True,
              help="The fold's novel classes, or its base classes (what training saw).")
@click.pass_obj
def fewshot_evaluate(context: _Context, model, images, out, shots, episodes, threshold, class_set, **episode_options):
    """DiffewS: score a few-shot model on seeded episodes (per-class IoU over episodes, mIoU, FB-IoU)."""
    from pipeline.fewshot.evaluation import evaluate_fewshot

    def action():
        settings = _fewshot_settings(images, episode_options, shots=shots, episodes=episodes, threshold=threshold)
        metrics = evaluate_fewshot(model, images, out, settings, context.show_progress, classes=class_set)
        click.echo(f"fewshot-evaluate: {settings.episodes} episodes of {shots} shot(s), mIoU {metrics['miou']:.4f}, "
                   f"FB-IoU {metrics['fb_iou']:.4f}; written to {out}")

    _run(context, action)


@main.command("fewshot-predict")
@click.option("--model", required=True, type=click.Path(path_type=Path), help="Folder of a model from fewshot-train.")
@click.option("--support", "support_images", required=True, multiple=True, type=click.Path(path_type=Path),
              help="A support image (repeat for more shots).")
@click.option("--support-mask", "support_masks", required=True, multiple=True, type=click.Path(path_type=Path),
              help="Its mask (PNG or .npy of the image's size, the class where not 0), in the same order as --support.")
@click.option("--images", required=True, type=click.Path(path_type=Path), help="Folder of PNG/JPEG images to segment.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for masks, overlays, summary.json, predictions.png.")
@click.option("--threshold", default=0.25, show_default=True, help="Foreground above this fraction of an image's maximum.")
@click.option("--device", default="auto", show_default=True)
@click.option("--pictures", default=6, show_default=True, help="Images in predictions.png.")
@click.pass_obj
def fewshot_predict(context: _Context, model, support_images, support_masks, images, out, threshold, device, pictures):
    """Segment new images as the class the support masks mark (a class the model never trained on)."""
    from pipeline.fewshot.prediction import predict_fewshot_folder

    def action():
        if len(support_images) != len(support_masks):
            raise click.UsageError(f"give one --support-mask per --support: {len(support_images)} images, "
                                   f"{len(support_masks)} masks")
        summary = predict_fewshot_folder(model, list(zip(support_images, support_masks)), images, out, threshold,
                                         device, show_progress=context.show_progress, pictures=pictures)
        click.echo(f"fewshot-predict: {summary.images} images segmented from {len(support_images)} support(s) into "
                   f"{summary.out_dir} ({1000 * summary.seconds_per_query:.0f} ms a query, the supports encoded once)")

    _run(context, action)


@main.command("fewshot-benchmark")
@click.option("--models", required=True, type=click.Path(path_type=Path),
              help="Folder of fold models: pretrained/fold-F (and random-init/fold-F) from fewshot-train.")
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path), help="The diffusion model the baselines read.")
@click.option("--images", required=True, type=click.Path(path_type=Path), help="Labeled image folder holding every fold's novel classes.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for metrics.json, fewshot.png and the runs.")
@click.option("--shots", default="1,5", show_default=True, help="Comma-separated support counts of the DiffewS models.")
@click.option("--episodes", default=1000, show_default=True, help="Episodes per fold and method (the same for each).")
@click.option("--ensemble-steps", default=400, show_default=True, help="Training steps per episode of the MLP ensemble baseline.")
@click.option("--device", default="auto", show_default=True)
@click.pass_obj
def fewshot_benchmark(context: _Context, models, checkpoint, images, out, shots, episodes, ensemble_steps, device):
    """Score every fold's few-shot model beside the baselines on the same episodes (mean over folds)."""
    from pipeline.fewshot.benchmark import benchmark_fewshot

    def action():
        settings = FewShotSettings(episodes=episodes, baseline_training_steps=ensemble_steps, device=device)
        summary = benchmark_fewshot(models, checkpoint, images, out, settings, _int_list(shots), context.show_progress)
        numbers = ", ".join(f"{key} {value}" for key, value in summary["metrics"].items())
        click.echo(f"fewshot-benchmark: {len(summary['folds'])} fold(s), {episodes} episodes each: {numbers}; written to {out}")

    _run(context, action)


@main.command("fewshot-baseline")
@click.option("--baseline", type=click.Choice(["prototype", "ensemble"]), required=True,
              help="prototype: cosine to the supports' foreground and background means; ensemble: the paper's MLPs trained on the supports.")
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path), help="The diffusion UNet whose frozen features the baseline reads.")
@click.option("--images", required=True, type=click.Path(path_type=Path), help="Labeled image folder to draw episodes from.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for metrics.json and episodes.png.")
@_fewshot_options
@click.option("--shots", default=1, show_default=True, help="Supports per episode.")
@click.option("--episodes", type=int, help="Episodes (the same as fewshot-evaluate's with the same options).")
@click.option("--feature-steps", default="25,50", show_default=True, help="Comma-separated diffusion steps of the features.")
@click.option("--feature-blocks", default="decoder", show_default=True, help="Comma-separated blocks (numbers, names, or decoder).")
@click.option("--members", default=10, show_default=True, help="ensemble: MLPs per episode.")
@click.option("--training-steps", default=400, show_default=True, help="ensemble: training steps per episode (256 pixels each).")
@click.option("--classes", "class_set", type=click.Choice(["test", "train"]), default="test", show_default=True)
@click.pass_obj
def fewshot_baseline(context: _Context, baseline, checkpoint, images, out, shots, episodes, feature_steps, feature_blocks,
                     members, training_steps, class_set, **episode_options):
    """Score a few-shot baseline on frozen diffusion features, on the episodes fewshot-evaluate draws."""
    from pipeline.fewshot.evaluation import evaluate_fewshot_baseline

    def action():
        settings = _fewshot_settings(images, episode_options, shots=shots, episodes=episodes,
                                     baseline_steps=_int_list(feature_steps), baseline_blocks=_tap_list(feature_blocks),
                                     baseline_members=members, baseline_training_steps=training_steps)
        metrics = evaluate_fewshot_baseline(baseline, checkpoint, images, out, settings, context.show_progress, class_set)
        click.echo(f"fewshot-baseline {baseline}: {settings.episodes} episodes of {shots} shot(s), mIoU {metrics['miou']:.4f}, "
                   f"FB-IoU {metrics['fb_iou']:.4f}; written to {out}")

    _run(context, action)


@main.command()
@click.option("--store", help="Feature store to look into (a folder or a URL).")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="With --taps: the checkpoint whose taps to list.")
@click.option("--taps", "list_taps", is_flag=True, help="List the checkpoint's valid taps (module paths) with their shapes.")
@click.option("--size", type=int, help="With --taps: input size (default: the model's sample size).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--image", help="Image index or name (with --pixel).")
@click.option("--pixel", nargs=2, type=int, multiple=True, help="Y X: print that pixel's feature vector (repeat with --export).")
@click.option("--verify", is_flag=True, help="Re-check every image against its checksum; exit 1 naming damaged images.")
@click.option("--stats", is_flag=True, help="Per (step, block): mean, std, fraction of zeros (first 8 images).")
@click.option("--pca", type=click.Path(path_type=Path), help="PNG: first 3 principal components of --image's features as RGB.")
@click.option("--similarity", nargs=3, type=(int, int, click.Path(path_type=Path)), help="Y X PNG: cosine similarity of every pixel to pixel (Y, X) of --image.")
@click.option("--compare-with", multiple=True, help="Other images for --similarity (repeatable).")
@click.option("--export", type=click.Path(path_type=Path), help=".npy or .csv: the --pixel features of --image.")
@click.pass_obj
def inspect(context: _Context, store, checkpoint, list_taps, size, as_json, image, pixel, verify, stats, pca,
            similarity, compare_with, export):
    """Describe a store, print or export pixels' features, draw what the features hold; no model needed.
    With --checkpoint --taps: the modules of a checkpoint that can be tapped, and their shapes."""
    from pipeline import inspection
    from pipeline.store.reader import FeatureStore

    def action():
        if list_taps:
            if checkpoint is None:
                raise click.UsageError("--taps needs --checkpoint")
            taps = inspection.checkpoint_taps(checkpoint, size)
            click.echo(json.dumps(taps, indent=1) if as_json else inspection.format_taps(taps))
            return
        if store is None:
            raise click.UsageError("give --store (or --checkpoint with --taps)")
        feature_store = FeatureStore(store)
        if verify:
            damaged = feature_store.damaged_images()
            checked = int(feature_store.done_mask().sum())
            if damaged:
                raise click.ClickException(f"{len(damaged)} of {checked} images in {store} are damaged: {', '.join(damaged)}")
            click.echo(f"verify: all {checked} finished images in {store} match their checksums")
            return
        if (pixel or pca or similarity or export) and image is None:
            raise click.UsageError("--pixel, --pca, --similarity and --export need --image")
        if pca:
            inspection.save_pca_pictures(feature_store, image, pca)
            click.echo(f"inspect: principal components of {image} saved to {pca}")
        if similarity:
            inspection.save_similarity_pictures(feature_store, image, *similarity, list(compare_with))
            click.echo(f"inspect: similarity map saved to {similarity[2]}")
        if export:
            features = inspection.export_pixel_features(feature_store, image, list(pixel), export)
            click.echo(f"inspect: {features.shape[0]} pixels × {features.shape[1]} features exported to {export}")
        elif pixel:
            features = inspection.pixel_feature_vector(feature_store, image, *pixel[0])
            click.echo(json.dumps({"features": features}) if as_json else " ".join(f"{v:.6g}" for v in features))
        if pca or similarity or export or pixel:
            return
        summary = inspection.store_summary(feature_store)
        if stats:
            summary["tap_statistics"] = inspection.tap_statistics(feature_store)
        click.echo(json.dumps(summary, indent=1) if as_json else inspection.format_summary(summary))

    _run(context, action)


@main.command()
@click.option("--images", required=True, type=click.Path(path_type=Path), help="Folder of unlabeled PNG/JPEG images.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run folder (resumed if it holds state.pt).")
@click.option("--steps", type=int, help="Total optimiser steps.")
@click.option("--batch-size", type=int, help="Images per step.")
@click.option("--image-size", type=int, help="Images are resized to this size.")
@click.option("--channels", help="Channels per level, comma-separated.")
@click.option("--attention-levels", help="Levels with attention (0 = full resolution), comma-separated.")
@click.option("--learning-rate", type=float, help="AdamW learning rate.")
@click.option("--ema-decay", type=float, help="Decay of the weight EMA.")
@click.option("--flips/--no-flips", default=None, help="Random horizontal flips.")
@click.option("--seed", type=int, help="Seeds the weights and every random draw.")
@click.option("--checkpoint-every", type=int, help="Steps between checkpoints.")
@click.option("--sample-every", type=int, help="Steps between sample grids while training (0: at the end only).")
@click.option("--sample-count", type=int, help="Images in samples.png.")
@click.option("--sample-steps", type=int, help="DDIM steps per sample.")
@click.option("--device", help="auto, cpu, cuda, cuda:1, mps…")
@click.option("--precision", type=click.Choice(["float32", "bfloat16"]),
              help="bfloat16: forward pass under autocast, faster on CPUs with AMX/AVX-512 BF16 and recent GPUs.")
@click.pass_obj
def pretrain(context: _Context, images, out, steps, batch_size, image_size, channels, attention_levels, learning_rate,
             ema_decay, flips, seed, checkpoint_every, sample_every, sample_count, sample_steps, device, precision):
    """Train a DDPM on a folder of unlabeled images (resumes an unfinished run in --out).

    Options left out take the defaults of PretrainSettings (pipeline/pretrain/settings.py).
    """
    from pipeline.pretrain.ddpm import PretrainSettings, pretrain_ddpm

    def action():
        given = {
            "steps": steps, "batch_size": batch_size, "image_size": image_size,
            "block_out_channels": _int_list(channels) if channels is not None else None,
            "attention_levels": _int_list(attention_levels) if attention_levels is not None else None,
            "learning_rate": learning_rate, "ema_decay": ema_decay, "horizontal_flips": flips, "seed": seed,
            "checkpoint_every": checkpoint_every, "sample_every": sample_every, "sample_count": sample_count,
            "sample_inference_steps": sample_steps, "device": device, "precision": precision,
        }
        # Options left out keep PretrainSettings' defaults: one place for them.
        settings = PretrainSettings(**{key: value for key, value in given.items() if value is not None})
        summary = pretrain_ddpm(images, out, settings, show_progress=context.show_progress)
        click.echo(
            f"pretrain: {summary.steps_done} steps (from {summary.resumed_from}) on {summary.images} images, "
            f"{summary.parameters} parameters, smoothed loss {summary.final_loss:.4f}; model saved to "
            f"{summary.model_dir} in {summary.seconds:.1f} s on {summary.device}"
        )

    _run(context, action)


@main.command()
@click.option("--preset", required=True,
              help="Preset name (bedroom_28, ffhq_34, cat_15, horse_21, celeba_19, ade_bedroom_30) or a preset file.")
@click.option("--out", default=".", show_default=True, type=click.Path(path_type=Path),
              help="Folder that receives checkpoints/<file> and datasets/ (where `benchmark` and presets/dvc.yaml look).")
@click.pass_obj
def download(context: _Context, preset, out):
    """Fetch a preset's official checkpoint and dataset archive (resumes a cut download; checks a recorded sha256)."""
    from pipeline.data.download import download_preset
    from pipeline.data.presets import load_preset

    def action():
        for result in download_preset(load_preset(preset), out, context.show_progress):
            how = ("already there" if result.already_present else
                   f"resumed after {result.resumed_from / 1e6:.1f} MB" if result.resumed_from else "downloaded")
            check = ("sha256 matches the preset's" if result.checked else
                     f"sha256 not checked (the preset records none): {result.sha256}")
            click.echo(f"download: {result.path} ({result.path.stat().st_size / 1e6:.1f} MB) {how}; {check}")

    _run(context, action)


@main.command()
@click.option("--preset", help="Preset name (shipped: bedroom_28, ffhq_34, cat_15, horse_21, celeba_19, ade_bedroom_30) or a preset file; default: made from the dataset's classes.json.")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Dataset root holding real/{train,test}/ (or train/, test/).")
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path), help="guided-diffusion .pt/.safetensors or diffusers folder.")
@click.option("--out", type=click.Path(path_type=Path), help="Run folder (default runs/benchmarks/<preset>); resumes extraction.")
@click.option("--seeds", default="0", show_default=True, help="Training seeds, comma-separated: one run each, mean ± std.")
@click.option("--protocol", type=click.Choice(["paper", "fast"]), default="paper", show_default=True)
@click.option("--iou", type=click.Choice(["paper", "ignore_excluded"]), default="paper", show_default=True, help="IoU definition of the headline mIoU (both are reported).")
@click.option("--classes", type=click.Path(path_type=Path), help="classes.json for a dataset without a preset (default <data>/classes.json).")
@click.option("--train-images", type=int, help="Override the preset: use the first N training images (0: all).")
@click.option("--test-images", type=int, help="Override the preset: use the first N test images (0: all).")
@click.option("--size", type=int, help="Override the preset's model input size.")
@click.option("--steps", help="Override the preset's steps, comma-separated.")
@click.option("--blocks", help="Override the preset's taps (block numbers or module paths), comma-separated.")
@click.option("--features", "feature_preset", help="A feature preset (shipped: sd21-dift): its size, steps, taps, noise draws and prompt replace the dataset preset's.")
@click.option("--members", default=10, show_default=True, help="MLPs in the ensemble.")
@click.option("--max-epochs", default=100, show_default=True)
@click.option("--batch-size", default=4, show_default=True, help="Images per UNet forward during extraction.")
@click.option("--layout", type=click.Choice(["native", "dense"]), default="native", show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, mps…")
@click.option("--threads", default=1, show_default=True, help="torch CPU threads for training and evaluation (0: torch's default).")
@click.option("--variant", type=click.Choice(["method", "datasetddpm"]), default="method", show_default=True,
              help="datasetddpm: per seed also the paper's DatasetDDPM (samples labeled by the seed's ensemble → a segmenter), the official recipe below.")
@click.option("--synthetic-count", default=10000, show_default=True, help="DatasetDDPM: samples per seed.")
@click.option("--sampler", type=click.Choice(["ddpm", "ddim"]), default="ddpm", show_default=True, help="DatasetDDPM: the sampler.")
@click.option("--sampling-steps", default=1000, show_default=True, help="DatasetDDPM: denoising steps.")
@click.option("--segmenter", "segmenter_architecture", type=click.Choice(["unet", "basic-unet", "deeplabv3-resnet101"]),
              default="deeplabv3-resnet101", show_default=True, help="DatasetDDPM: the segmenter.")
@click.option("--learning-curve", "curve_budgets", help="Also a learning curve on the same stores: these numbers of labeled "
                                                        "images, comma-separated (e.g. 1,2,5,10,20).")
@click.option("--curve-draws", default=3, show_default=True, help="Learning curve: draws of which images per budget.")
@click.pass_obj
def benchmark(context: _Context, preset, data, checkpoint, out, seeds, protocol, iou, classes, train_images, test_images,
              size, steps, blocks, feature_preset, members, max_epochs, batch_size, layout, device, threads, variant,
              synthetic_count, sampler, sampling_steps, segmenter_architecture, curve_budgets, curve_draws):
    """Run a benchmark end to end (extract train+test once, train and evaluate per seed) and write report.json/.md."""
    from pipeline.benchmark import choose_preset, run_benchmark, summary_line
    from pipeline.data.presets import load_feature_preset

    def action():
        features = load_feature_preset(feature_preset) if feature_preset else None
        given = {"image_size": size, "steps": _int_list(steps) if steps else None,
                 "blocks": _tap_list(blocks) if blocks else None}
        if features is not None:  # options given on the command line still win
            published = {"image_size": features.image_size, "steps": features.steps, "blocks": features.blocks}
            given = {key: published[key] if value is None else value for key, value in given.items()}
        chosen, overrides = choose_preset(
            preset, data, classes, train_images=train_images, test_images=test_images, **given
        )
        extract_settings = ExtractSettings(
            layout=layout, batch_size=batch_size, device=device,
            noise_draws=features.noise_draws if features else 1, prompt=features.prompt if features else "",
        )
        if features is not None:
            overrides["features"] = features.name
        train_settings = TrainSettings(protocol=protocol, members=members, max_epochs=max_epochs, device=device, threads=threads)
        evaluate_settings = EvaluateSettings(iou=iou, threads=threads)
        run_dir = out or Path("runs") / "benchmarks" / chosen.name
        datasetddpm = None
        if variant == "datasetddpm":
            datasetddpm = (
                SynthesizeSettings(count=synthetic_count, sampler=sampler, sampling_steps=sampling_steps, device=device),
                SegmenterSettings(architecture=segmenter_architecture, device=device, threads=threads),
            )
        curve = None
        if curve_budgets:
            from pipeline.config import LearningCurveSettings

            curve = LearningCurveSettings(budgets=_int_list(curve_budgets), draws=curve_draws, members=members,
                                          protocol=protocol)
        report = run_benchmark(
            chosen, data, checkpoint, run_dir, extract_settings, train_settings, evaluate_settings, _int_list(seeds),
            overrides, context.show_progress, datasetddpm, curve,
        )
        click.echo(f"{summary_line(report)}; report in {run_dir / 'report.md'}")

    _run(context, action)


if __name__ == "__main__":
    main()
