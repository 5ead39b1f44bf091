"""Typed settings: `params.yaml` sections become frozen dataclasses.

Every section is checked at the boundary: an unknown key, a missing key or a value of the
wrong type is a `ValueError` that names the file, the key and the problem. Nothing else in
the code reads raw YAML.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline import sizes

Layout = Literal["native", "dense"]
Codec = Literal["blosc-lz4", "zstd", "none"]
Protocol = Literal["paper", "fast"]
IoUDefinition = Literal["paper", "ignore_excluded"]
SamplerName = Literal["ddpm", "ddim"]
BenchmarkVariant = Literal["method", "datasetddpm"]
SegmenterArchitecture = Literal["unet", "basic-unet", "deeplabv3-resnet101"]


@dataclasses.dataclass(frozen=True)
class DemoSpec:
    """What the demo dataset generator (pipeline/data/demo.py) makes.

    Attributes:
        size: Side of the square images in pixels (at least 16).
        pool_images: Unlabeled faces for DDPM training.
        train_images: Labeled few-shot training faces.
        test_images: Labeled test faces (their own random stream).
        seed: Seed of every random choice.
    """

    size: int = 32
    pool_images: int = 4000
    train_images: int = 20
    test_images: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        check_demo_size(self.size)
        for name in ("pool_images", "train_images", "test_images"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def check_demo_size(size: int) -> None:
    if size < 16:
        raise ValueError(f"image size must be at least 16 pixels, got {size}")


@dataclasses.dataclass(frozen=True)
class ExtractSettings:
    """How pixel features are made and stored.

    Attributes:
        steps: diffusion steps t at which the UNet is run, in feature order.
        blocks: the taps, in feature order: guided-diffusion decoder block numbers (`output_blocks`
            index: 5, 12) and/or module paths of the UNet ("up_blocks.1.attentions.0").
        seed: seed of the one noise image shared by all images and steps.
        size: model input size: S (images resized to S×S, the paper's protocol) or [H, W].
        resize: instead of `size`, a rule that keeps the images' aspect ratio: "shorter:256"
            (the shorter side becomes 256, the other is rounded to the model's multiple) or
            "longer:N". The store holds one size: images of other shapes are resized to it.
        layout: "native" (each block at its own resolution) or "dense" (upsampled pixels).
        batch_size: images per UNet forward.
        device: "auto" (cuda > mps > cpu) or a torch device string.
        codec: compression of the float16 chunks. None by default: native stores compress 1.00-1.02x
            with blosc-lz4, which costs the writer 1.5x the CPU per image at GPU rates and, in most
            runs, speed (bench/results/extraction_gpu_rate.json, storage_codecs.json); zstd suits
            archiving a dense store.
        scheduler: address of a Dask distributed scheduler (e.g. "tcp://10.0.0.5:8786") whose
            workers run the batches; None runs them in this process.
        noise_draws: features averaged over this many noise draws (draw k: seed + k; DIFT uses 8).
        prompt: latent-diffusion folders: the text encoded by the folder's text encoder.
        prompt_embeds: latent-diffusion folders: a `.safetensors`/`.npy` file of a (1, L, D)
            tensor, in place of the prompt (for folders without a text encoder).
    """

    steps: list[int] = dataclasses.field(default_factory=lambda: [50, 150, 250])
    blocks: list[int | str] = dataclasses.field(default_factory=lambda: [5, 6, 7, 8, 12])
    seed: int = 0
    size: int | list[int] = 256
    resize: str | None = None
    layout: Layout = "native"
    batch_size: int = 4
    device: str = "auto"
    codec: Codec = "none"
    scheduler: str | None = None
    noise_draws: int = 1
    prompt: str = ""
    prompt_embeds: str | None = None

    def __post_init__(self) -> None:
        if self.noise_draws < 1:
            raise ValueError(f"extract: `noise_draws` must be at least 1, got {self.noise_draws}")
        if not self.steps or not self.blocks:
            raise ValueError("extract: `steps` and `blocks` must not be empty")
        bad_steps = [step for step in self.steps if not 0 <= step <= 999]
        if bad_steps:
            raise ValueError(f"extract: steps must lie in 0..999, got {bad_steps}")
        if len(set(self.steps)) != len(self.steps) or len(set(self.blocks)) != len(self.blocks):
            raise ValueError(f"extract: repeated steps or blocks: {self.steps}, {self.blocks}")
        if self.batch_size <= 0:
            raise ValueError(f"extract: batch_size must be positive, got {self.batch_size}")
        sizes.check_size(self.size)
        if self.resize is not None:
            sizes.check_rule(self.resize)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """How the MLP ensemble is trained (the paper's protocol by default; the fast one is selectable).

    Attributes:
        protocol: "paper" follows the official implementation (members one after the other,
            batch 64); "fast" trains all members together as batched matrix products with
            `fast_batch_size` pixels per member and step, each member in its own order.
        members: number of MLPs in the ensemble.
        hidden_widths: each member's two hidden layer widths; None: the paper's rule, (128, 32)
            below 30 classes and (256, 128) from 30 on.
        steps: train on these of the store's steps only (None: all of them).
        blocks: train on these of the store's taps only, by name or guided-diffusion block
            number (None: all of them); changing `steps` or `blocks` never re-runs extraction.
        seed: seeds initialisation and the pixel order of every member.
        learning_rate: Adam learning rate.
        batch_size: pixels per optimiser step.
        max_epochs: upper bound on epochs per member.
        patience: stop after more than this many iterations in a row without a new best batch loss.
        patience_from_epoch: the patience count starts at this epoch index (the paper: epoch > 3).
        min_class_pixels: per image, a class with fewer labeled pixels is ignored. None: the
            paper's 20 pixels at 256×256, scaled with the image area (1 at 32×32: no class is
            dropped), so small parts of small images are not erased.
        buffer_pixels: pixels gathered from the store at a time (bounds memory).
        cache_megabytes: RAM for the native feature tables kept between buffers.
        device: where the ensemble trains: "auto" (cuda > mps > cpu) or a torch device string.
        threads: torch CPU threads while training (0: torch's default). 1 by default in every
            stage: on 2 cores, 2 threads were 1.35-1.8x faster on a quiet machine but 1.7-3.3x
            slower than 1 beside one busy process, while 1 thread lost nothing to it
            (bench/results/thread_defaults.json). Raise it on a machine kept to this job.
        fast_batch_size: pixels per member and step in the fast protocol.
        fast_learning_rate: Adam's initial learning rate in the fast protocol (decays linearly to 0).
        fast_epochs: passes over the labeled pixels in the fast protocol (may be fractional).
        fast_min_steps: the fast protocol takes at least this many steps, however few the
            pixels (small images: 1.5 passes over 20 images of 32×32 are only 120 steps).
        scheduler: address of a Dask distributed scheduler whose workers read the features;
            None reads them with threads in this process. The ensemble trains here either way.
    """

    protocol: Protocol = "paper"
    members: int = 10
    hidden_widths: list[int] | None = None
    steps: list[int] | None = None
    blocks: list[int | str] | None = None
    seed: int = 0
    learning_rate: float = 0.001
    batch_size: int = 64
    max_epochs: int = 100
    patience: int = 50
    patience_from_epoch: int = 4
    min_class_pixels: int | None = None
    buffer_pixels: int = 32768
    cache_megabytes: int = 512
    device: str = "auto"
    threads: int = 1
    fast_batch_size: int = 256
    fast_learning_rate: float = 0.006
    fast_epochs: float = 1.5
    fast_min_steps: int = 400
    scheduler: str | None = None

    def __post_init__(self) -> None:
        positive = ("members", "batch_size", "max_epochs", "buffer_pixels", "learning_rate", "fast_batch_size",
                    "fast_learning_rate", "fast_epochs")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"train: `{name}` must be positive, got {getattr(self, name)}")
        if self.hidden_widths is not None and (len(self.hidden_widths) != 2 or min(self.hidden_widths) <= 0):
            raise ValueError(f"train: `hidden_widths` must be two positive widths or null, got {self.hidden_widths}")
        if self.fast_min_steps < 0 or (self.min_class_pixels is not None and self.min_class_pixels < 0):
            raise ValueError(
                f"train: `fast_min_steps` and `min_class_pixels` must be >= 0, got {self.fast_min_steps}, {self.min_class_pixels}"
            )


@dataclasses.dataclass(frozen=True)
class BaselineSettings:
    """The baselines the demo compares the diffusion features with.

    Attributes:
        random_weights_seed: seed of the same UNet's random initialisation.
        pixel_neighbourhood: odd window width of the raw-pixel features (3: 27 values per pixel).
    """

    random_weights_seed: int = 0
    pixel_neighbourhood: int = 3


@dataclasses.dataclass(frozen=True)
class EvaluateSettings:
    """How test images are predicted and scored.

    Attributes:
        pixels_per_batch: pixels pushed through the ensemble at once.
        pictures: how many test images get a picture in the prediction grid.
        threads: torch CPU threads while predicting (0: torch's default; see TrainSettings).
        iou: which IoU `miou` reports: "paper" (the official code's: predictions on ignored
            pixels count against the predicted class, absent classes score 0) or
            "ignore_excluded" (ignored pixels count nowhere, absent classes are left out).
            metrics.json holds both.
    """

    pixels_per_batch: int = 16384
    pictures: int = 6
    threads: int = 1
    iou: IoUDefinition = "paper"


@dataclasses.dataclass(frozen=True)
class BenchmarkSettings:
    """Which benchmark a run reproduces (the `benchmark` section of presets/params.yaml).

    The preset fixes classes, image counts, size, steps and blocks; the `extract`, `train` and
    `evaluate` sections give the rest (their size, steps and blocks are replaced by the preset's).

    Attributes:
        dataset: a preset name (pipeline/data/preset_files/<name>.yaml) or a preset file.
        seeds: one training run per seed; the report gives mean ± std over them.
        train_images: use this many training images instead of the preset's (None: the preset's).
        test_images: the same for test images.
        variant: "method" (the ensemble on the diffusion features) or "datasetddpm" (also, per
            seed, the `synthesize` and `segmenter` sections' DatasetDDPM, scored on the same test set).
    """

    dataset: str = "ffhq_34"
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])
    train_images: int | None = None
    test_images: int | None = None
    variant: BenchmarkVariant = "method"

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError("benchmark: `seeds` must not be empty")


def _type_matches(value: Any, expected: Any) -> bool:
    """Whether a YAML value has the declared type (bool is not an int; int is a float)."""
    origin = typing.get_origin(expected)
    if origin is Literal:
        return value in typing.get_args(expected)
    if origin is list:
        (item_type,) = typing.get_args(expected)
        return isinstance(value, list) and all(_type_matches(item, item_type) for item in value)
    if origin is dict:
        key_type, value_type = typing.get_args(expected)
        return isinstance(value, dict) and all(
            _type_matches(key, key_type) and _type_matches(item, value_type) for key, item in value.items())
    if origin in (typing.Union, types.UnionType):
        return any(_type_matches(value, option) for option in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _describe(expected: Any) -> str:
    if typing.get_origin(expected) is Literal:
        return " or ".join(repr(option) for option in typing.get_args(expected))
    return getattr(expected, "__name__", str(expected))


def settings_from_mapping(settings_class: type, mapping: Any, where: str):
    """Builds a settings dataclass from a YAML mapping, refusing unknown keys and bad types.

    Args:
        settings_class: one of the settings dataclasses above.
        mapping: the parsed YAML section (a dict; None means all defaults).
        where: a description of the source for messages, e.g. "params.yaml: train".

    Returns:
        An instance of `settings_class`.

    Raises:
        ValueError: naming the section and key that is unknown or has the wrong type.
    """
    mapping = {} if mapping is None else mapping
    if not isinstance(mapping, dict):
        raise ValueError(f"{where}: expected a mapping of settings, got {type(mapping).__name__}")
    hints = typing.get_type_hints(settings_class)
    known = {field.name for field in dataclasses.fields(settings_class)}
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known keys are {sorted(known)}")
    for key, value in mapping.items():
        if not _type_matches(value, hints[key]):
            raise ValueError(
                f"{where}: `{key}` must be {_describe(hints[key])}, got {value!r} ({type(value).__name__})"
            )
    try:
        return settings_class(**mapping)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


@dataclasses.dataclass(frozen=True)
class SelectSettings:
    """How `select` chooses steps and taps from the labeled images (see pipeline/heads/selection.py).

    Attributes:
        folds: cross-validation folds over the labeled images.
        pixels_per_image: labeled pixels sampled from each image for the probe.
        min_gain_points: keep adding a step or a tap while validation mIoU rises by more than
            this many points.
        max_features: never choose more features per pixel (None: no limit).
        seed: seeds the pixel sample and the folds.
        steps, blocks: the candidates: these of the store's steps and taps (names or block
            numbers) only; None: all it holds.
        memory_gigabytes: the exact probe (every candidate feature) where its memory fits in
            this, else the reduced one (see pipeline/heads/probe_features.py).
        components: the reduced probe's principal components per (step, tap).
    """

    folds: int = 5
    pixels_per_image: int = 500
    min_gain_points: float = 0.2
    max_features: int | None = None
    seed: int = 0
    steps: list[int] | None = None
    blocks: list[int | str] | None = None
    memory_gigabytes: float = 4.0
    components: int = 32

    def __post_init__(self) -> None:
        if self.folds < 2 or self.pixels_per_image < 1 or self.min_gain_points < 0:
            raise ValueError(
                f"select: need folds >= 2, pixels_per_image >= 1, min_gain_points >= 0; got {self.folds}, "
                f"{self.pixels_per_image}, {self.min_gain_points}"
            )
        if self.memory_gigabytes <= 0 or self.components < 1:
            raise ValueError(f"select: need memory_gigabytes > 0 and components >= 1; got "
                             f"{self.memory_gigabytes}, {self.components}")


@dataclasses.dataclass(frozen=True)
class LearningCurveSettings:
    """The learning curve (pipeline/evaluation/learning_curve.py): test mIoU against labeled images.

    Attributes:
        budgets: numbers of labeled training images.
        draws: draws of which images per budget (one where the budget takes them all).
        seed: seeds the draws.
        members, protocol: the ensembles' (the rest of `train`'s settings as they are).
    """

    budgets: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 5, 10, 20])
    draws: int = 3
    seed: int = 0
    members: int = 10
    protocol: Protocol = "fast"

    def __post_init__(self) -> None:
        if not self.budgets or min(self.budgets) < 1 or self.draws < 1 or self.members < 1:
            raise ValueError(f"learning_curve: need budgets >= 1, draws >= 1, members >= 1; got {self.budgets}, "
                             f"{self.draws}, {self.members}")


@dataclasses.dataclass(frozen=True)
class SynthesizeSettings:
    """DatasetDDPM's synthetic dataset (pipeline/synthetic/): how many samples, how, which are kept.

    Attributes:
        count: samples drawn (the official script: 10,000; its released sets: 50,000).
        sampler: "ddpm" (ancestral, the official sampler) or "ddim" (deterministic, η = 0).
        sampling_steps: denoising steps (the official: 1000, every training step).
        filter_fraction: share of the samples dropped by the uncertainty filter (the official 0.1).
        filter_lowest_fraction: share dropped from the least uncertain end (the official 30 of
            10,000: 0.003); the rest of `filter_fraction` from the most uncertain end.
        batch_size: samples per batch (memory follows it, not `count`).
        seed: seeds every sample's own generator (sample i: (seed, i)).
        pictures: kept samples drawn in pictures/samples.png (0: none).
        device, threads: where sampling runs, and torch's CPU threads (0: torch's default;
            1, the default: see TrainSettings).
    """

    count: int = 10000
    sampler: SamplerName = "ddpm"
    sampling_steps: int = 1000
    filter_fraction: float = 0.1
    filter_lowest_fraction: float = 0.003
    batch_size: int = 16
    seed: int = 0
    pictures: int = 8
    device: str = "auto"
    threads: int = 1

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"synthesize: count must be at least 1, got {self.count}")
        if self.sampling_steps < 1 or self.batch_size < 1 or self.pictures < 0:
            raise ValueError("synthesize: sampling_steps and batch_size must be positive, pictures >= 0")
        if not 0 <= self.filter_fraction < 1 or not 0 <= self.filter_lowest_fraction <= self.filter_fraction:
            raise ValueError(
                "synthesize: need 0 <= filter_fraction < 1 and 0 <= filter_lowest_fraction <= filter_fraction, "
                f"got {self.filter_fraction}, {self.filter_lowest_fraction}"
            )


@dataclasses.dataclass(frozen=True)
class SegmenterSettings:
    """The segmenter distilled from a synthetic dataset (pipeline/heads/segmenter/).

    Attributes:
        architecture: "unet" (MONAI's residual UNet, small: trains from scratch on a CPU),
            "basic-unet" (MONAI's BasicUNet) or "deeplabv3-resnet101" (torchvision, ImageNet
            backbone: the paper's; needs torchvision and its weights).
        width: the UNets' first-level channels (each level doubles them); DeepLab ignores it.
        epochs: passes over the synthetic images (the official: 20).
        batch_size: images per step (the official: 8; a short last batch is dropped, as there).
        learning_rate: Adam's (the official: 0.001).
        image_size: train and predict at this size (None: the images' own, which must agree).
        flips: mirror a random half of each batch left-right (the official recipe has no
            augmentation; only for classes without a left and a right, e.g. not "left eye").
        seed: seeds the weights, the shuffling and the flips.
        device, threads: where it trains, and torch's CPU threads (0: torch's default;
            1, the default: see TrainSettings).
    """

    architecture: SegmenterArchitecture = "unet"
    width: int = 16
    epochs: int = 20
    batch_size: int = 8
    learning_rate: float = 0.001
    image_size: int | None = None
    flips: bool = False
    seed: int = 0
    device: str = "auto"
    threads: int = 1

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.learning_rate <= 0 or self.width < 1:
            raise ValueError("segmenter: width, epochs, batch_size and learning_rate must be positive")
        if self.image_size is not None:
            sizes.check_size(self.image_size)


@dataclasses.dataclass(frozen=True)
class FewShotSettings:
    """DiffewS, in-context few-shot segmentation (pipeline/fewshot/): its episodes, training and decoding.

    Attributes:
        folds, fold: classes split into `folds` folds (COCO-20i: 4, fold f's novel classes every
            folds-th from f); training sees the other folds' classes only, evaluation this fold's.
        shots: supports per evaluation episode (1 or 5 in the paper).
        max_training_shots: each training step draws 1..this many supports (the official: 1..N).
        episodes: evaluation episodes (the official: 1,000 per fold, seed 0).
        steps, batch_size: training steps of `batch_size` episodes.
        learning_rate, weight_decay, grad_clip: AdamW with linear decay to 0, gradients clipped
            to this norm (the official: 1e-5, 0.01, 1.0 for Stable Diffusion).
        threshold: foreground where the decoded map exceeds this fraction of its maximum (0.25).
        image_size: episodes at this size (None: the model's own).
        min_pixels: an image holds a class from this many pixels at `image_size` on.
        seed: seeds the training episodes; evaluation episodes use `seed` too (the official: 0).
        fold_layout: "interleaved" (COCO-20i, LVIS-92i: fold f tests every folds-th class from
            f) or "blocks" (PASCAL-5i: contiguous blocks).
        novel_classes: the novel (test) classes by name, a split of your own (e.g. LVIS-92i's, or
            training data with extra base classes the evaluation images lack) instead of fold
            `fold` of `folds`; every other class but the background is a base class.
        class_weights: training episodes draw a base class with probability in proportion to
            its weight here, by name (1 where unlisted): e.g. as many episodes of a few real
            classes as of many synthetic ones. Evaluation draws uniformly, as the protocol does.
        random_init: fine-tune a randomly initialised copy of the checkpoint's UNet instead (the
            baseline that shows what the pretraining brings).
        fine_attention: pixel-space UNets: add zero-initialised self-attention (KV-fused too) to
            the blocks working at these sides (e.g. [16, 8] for the demo's 32×32 UNet, which
            attends only at 4×4 and 2×2); [] adds none (the paper's SD attends at every level).
        trainable: "all" (the paper: the whole UNet) or "attention" (self-attention layers, the
            support stem and the output head; the pretrained convolutions frozen).
        baseline_steps, baseline_blocks: the frozen features the baselines (prototype matching,
            the MLP ensemble on the supports) read.
        baseline_members, baseline_training_steps: MLPs of the ensemble baseline and their
            training steps per episode (fast protocol: all members at once, 256 pixels a step).
        device, threads: where it runs, torch's CPU threads (0: torch's default;
            1, the default: see TrainSettings).
    """

    folds: int = 4
    fold: int = 0
    shots: int = 1
    max_training_shots: int = 1
    episodes: int = 1000
    steps: int = 1000
    batch_size: int = 4
    learning_rate: float = 1e-5
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    threshold: float = 0.25
    image_size: int | None = None
    min_pixels: int = 1
    seed: int = 0
    fold_layout: Literal["interleaved", "blocks"] = "interleaved"
    novel_classes: list[str] | None = None
    class_weights: dict[str, float] = dataclasses.field(default_factory=dict)
    random_init: bool = False
    fine_attention: list[int] = dataclasses.field(default_factory=list)
    trainable: Literal["all", "attention"] = "all"
    baseline_steps: list[int] = dataclasses.field(default_factory=lambda: [25, 50])
    baseline_blocks: list[int | str] = dataclasses.field(default_factory=lambda: ["decoder"])
    baseline_members: int = 10
    baseline_training_steps: int = 400
    device: str = "auto"
    threads: int = 1

    def __post_init__(self) -> None:
        if self.folds < 1 or not 0 <= self.fold < self.folds:
            raise ValueError(f"fewshot: need 0 <= fold < folds, got fold {self.fold} of {self.folds}")
        if min(self.shots, self.max_training_shots, self.episodes, self.steps, self.batch_size, self.min_pixels,
               self.baseline_members, self.baseline_training_steps) < 1:
            raise ValueError("fewshot: shots, max_training_shots, episodes, steps, batch_size, min_pixels, "
                             "baseline_members and baseline_training_steps must be >= 1")
        if self.learning_rate <= 0 or self.weight_decay < 0 or self.grad_clip <= 0 or not 0 < self.threshold < 1:
            raise ValueError("fewshot: need learning_rate > 0, weight_decay >= 0, grad_clip > 0, 0 < threshold < 1")
        if any(not weight > 0 for weight in self.class_weights.values()):
            raise ValueError(f"fewshot: class_weights must be positive, got {self.class_weights}")


FirstPrediction = Literal["out_of_fold", "in_fold"]


@dataclasses.dataclass(frozen=True)
class RefineSettings:
    """The mask-prior refiner (pipeline/refine/): how it is trained, and how it refines.

    Attributes:
        folds: out-of-fold first predictions come from this many ensembles, each trained on the
            other folds of the labeled images (the settings of `train`, the ensemble's taps).
        first_prediction: "in_fold" (the final ensemble's own predictions of its training images)
            or "out_of_fold" (each training image predicted by an ensemble that never saw it, the
            kind of mistakes the refiner meets on new images, for `folds` ensemble trainings).
        projection_dims: principal components of the pixel features the refiner sees beside the
            ensemble's probabilities (0: the probabilities only).
        diffusion_steps: T of the mask diffusion.
        width: channels of the refiner's network.
        iterations, batch_size, learning_rate: its training (Adam, cosine decay to 0).
        crop: training crops are this fraction of the image side (1: whole images); with
            horizontal flips when `flips`.
        schedule: the steps at which `refine` re-noises its current map, from the first
            prediction down (descending, each in 1..T).
        seed: seeds the folds, the network, its training and the refinement's noise.
        device, threads: where and with how many CPU threads it trains and refines.
    """

    folds: int = 5
    first_prediction: FirstPrediction = "in_fold"
    projection_dims: int = 16
    diffusion_steps: int = 10
    width: int = 32
    iterations: int = 2000
    batch_size: int = 8
    learning_rate: float = 0.001
    crop: float = 0.75
    flips: bool = True
    schedule: list[int] = dataclasses.field(default_factory=lambda: [5, 3, 1])
    seed: int = 0
    device: str = "auto"
    threads: int = 1

    def __post_init__(self) -> None:
        if self.folds < 2 or self.projection_dims < 0 or self.diffusion_steps < 1 or self.width < 8 or self.width % 8:
            raise ValueError("refine: need folds >= 2, projection_dims >= 0, diffusion_steps >= 1, width a multiple of 8")
        if self.iterations < 1 or self.batch_size < 1 or self.learning_rate <= 0 or not 0 < self.crop <= 1:
            raise ValueError("refine: iterations, batch_size and learning_rate must be positive, crop in (0, 1]")
        if not self.schedule or any(not 1 <= t <= self.diffusion_steps for t in self.schedule) or \
                self.schedule != sorted(self.schedule, reverse=True):
            raise ValueError(f"refine: `schedule` must descend within 1..{self.diffusion_steps}, got {self.schedule}")


@dataclasses.dataclass(frozen=True)
class Params:
    """All of `params.yaml`."""

    demo: DemoSpec
    extract: ExtractSettings
    train: TrainSettings
    evaluate: EvaluateSettings
    baselines: BaselineSettings
    benchmark: BenchmarkSettings = dataclasses.field(default_factory=BenchmarkSettings)
    select: SelectSettings = dataclasses.field(default_factory=SelectSettings)
    refine: RefineSettings = dataclasses.field(default_factory=RefineSettings)
    synthesize: SynthesizeSettings = dataclasses.field(default_factory=SynthesizeSettings)
    segmenter: SegmenterSettings = dataclasses.field(default_factory=SegmenterSettings)
    fewshot: FewShotSettings = dataclasses.field(default_factory=FewShotSettings)
    learning_curve: LearningCurveSettings = dataclasses.field(default_factory=LearningCurveSettings)


_SECTIONS = {"demo": DemoSpec, "extract": ExtractSettings, "train": TrainSettings, "evaluate": EvaluateSettings,
             "baselines": BaselineSettings, "benchmark": BenchmarkSettings, "select": SelectSettings,
             "refine": RefineSettings, "synthesize": SynthesizeSettings, "segmenter": SegmenterSettings,
             "fewshot": FewShotSettings, "learning_curve": LearningCurveSettings}


def load_params(path: str | Path = "params.yaml") -> Params:
    """Reads and checks `params.yaml`.

    Raises:
        FileNotFoundError: when the file is missing.
        ValueError: on YAML errors, unknown sections or keys, and mistyped values.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"params file not found: {path}")
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(document, dict):
        raise ValueError(f"{path}: expected a mapping of sections at the top level")
    unknown = sorted(set(document) - set(_SECTIONS))
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {unknown}; known sections are {sorted(_SECTIONS)}")
    sections = {
        name: settings_from_mapping(settings_class, document.get(name), f"{path}: {name}")
        for name, settings_class in _SECTIONS.items()
    }
    return Params(**sections)
