"""Benchmark presets: the paper's six datasets as data files in `pipeline/data/preset_files/<name>.yaml`.

A preset holds what one benchmark needs besides the images: class names and the ignore label,
how many of the (sorted) train and test images the protocol uses, the model size, steps and
blocks, the checkpoint the paper used, and the paper's mIoU to compare with. A user's own
dataset becomes a preset too (`preset_for_dataset`), from its `classes.json`.

The YAML files are package data, read through importlib.resources, so that an installed wheel
finds them as a checkout does (`benchmark --preset` from anywhere).
"""

from __future__ import annotations

import dataclasses
import re
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Literal

import yaml

from pipeline.config import settings_from_mapping
from pipeline.data.folders import ClassInfo

PRESET_FILES = resources.files("pipeline.data") / "preset_files"  # features/ and fewshot/ inside it


@dataclasses.dataclass(frozen=True)
class Preset:
    """One benchmark.

    Attributes:
        name: the benchmark's name, e.g. "ffhq_34".
        description: what the images and classes are.
        class_names: K names; label value k is class_names[k].
        num_classes: K, stated separately so that a miscounted list is caught.
        ignore_label: the label of pixels that are never trained nor scored (may be a class index).
        train_images: how many of the sorted training images are used (the paper's "first N");
            0: all of them.
        test_images: the same for the test images.
        image_size: the model's input size (images and labels are resized to it).
        steps: diffusion steps t, in feature order.
        blocks: the taps in feature order: guided-diffusion decoder block numbers and/or module paths.
        checkpoint: file name of the checkpoint the paper used ("" when none).
        checkpoint_url: where that checkpoint is published ("" when none).
        checkpoint_sha256: its hex sha256 where one is known ("" when none: `download` then says
            it did not check the file). Never guessed: the publishers give none.
        dataset_url: where the dataset's archive is published ("" when none); the official
            release packs all six benchmarks in one archive.
        dataset_sha256: that archive's hex sha256 where one is known ("" when none).
        paper_miou: the paper's mIoU in percent (None for a user's dataset).
        paper_miou_std: its standard deviation over runs, in percent.
        paper_datasetddpm_miou: the paper's DatasetDDPM row (a segmenter trained on labeled DDPM
            samples), in percent (None where the paper has none).
        paper_datasetddpm_miou_std: its standard deviation, in percent.
    """

    name: str
    class_names: list[str]
    num_classes: int
    ignore_label: int
    train_images: int
    test_images: int
    description: str = ""
    image_size: int = 256
    steps: list[int] = dataclasses.field(default_factory=lambda: [50, 150, 250])
    blocks: list[int | str] = dataclasses.field(default_factory=lambda: [5, 6, 7, 8, 12])
    checkpoint: str = ""
    checkpoint_url: str = ""
    checkpoint_sha256: str = ""
    dataset_url: str = ""
    dataset_sha256: str = ""
    paper_miou: float | None = None
    paper_miou_std: float | None = None
    paper_datasetddpm_miou: float | None = None
    paper_datasetddpm_miou_std: float | None = None

    def __post_init__(self) -> None:
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"num_classes is {self.num_classes} but class_names lists {len(self.class_names)} names")
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError("class_names has repeated names")
        for name in ("checkpoint_sha256", "dataset_sha256"):
            digest = getattr(self, name)
            if digest and not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
                raise ValueError(f"{name} must be 64 hex digits or empty, got {digest!r}")
        if self.train_images < 0 or self.test_images < 0 or self.image_size <= 0:
            raise ValueError(
                f"train_images and test_images must be ≥ 0 and image_size positive, got "
                f"{self.train_images}, {self.test_images}, {self.image_size}"
            )

    @property
    def classes(self) -> ClassInfo:
        return ClassInfo(names=list(self.class_names), ignore_label=self.ignore_label)

    @property
    def scored_classes(self) -> int:
        """Classes that count in mIoU: all but the ignore label when it is a class index."""
        return self.num_classes - (1 if 0 <= self.ignore_label < self.num_classes else 0)


def _yaml_names(folder: Traversable) -> list[str]:
    """Stems of the .yaml files in a folder of package data, sorted."""
    return sorted(entry.name.removesuffix(".yaml") for entry in folder.iterdir()
                  if entry.name.endswith(".yaml") and entry.is_file())


def _shipped_or_given(name_or_path: str | Path, folder: Traversable) -> Traversable | Path:
    """A YAML file path as given, or the shipped `<folder>/<name>.yaml`."""
    candidate = Path(name_or_path)
    return candidate if candidate.suffix in (".yaml", ".yml") else folder / f"{name_or_path}.yaml"


def preset_names() -> list[str]:
    """Names of the presets shipped in `pipeline/data/preset_files/`, sorted."""
    return _yaml_names(PRESET_FILES)


def load_preset(name_or_path: str | Path) -> Preset:
    """Reads a preset by name (`pipeline/data/preset_files/<name>.yaml`) or from a YAML file path.

    Raises:
        FileNotFoundError: naming the known presets when the name is unknown.
        ValueError: naming the file and key on unknown keys, wrong types or a miscounted class list.
    """
    path = _shipped_or_given(name_or_path, PRESET_FILES)
    if not path.is_file():
        raise FileNotFoundError(f"no preset {str(name_or_path)!r} ({path} not found); known presets: {preset_names()}")
    return _read_settings_file(Preset, path)


def _read_settings_file(settings_class: type, path: Traversable | Path):
    """A settings dataclass from a YAML file: every required key present, no unknown key, right types.

    Raises:
        ValueError: naming the file and the key (or that it is not YAML).
    """
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {error}") from None
    required = [field.name for field in dataclasses.fields(settings_class) if field.default is dataclasses.MISSING
                and field.default_factory is dataclasses.MISSING]
    missing = [key for key in required if not isinstance(document, dict) or key not in document]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}")
    return settings_from_mapping(settings_class, document, str(path))


@dataclasses.dataclass(frozen=True)
class FeaturePreset:
    """Published feature settings for a model family, applied to any dataset
    (`pipeline/data/preset_files/features/<name>.yaml`; each file cites where its settings come from).

    Attributes:
        name: e.g. "sd21-dift".
        description: one line.
        checkpoint: the model the settings were published with.
        image_size: the model input size.
        steps: diffusion steps t, in feature order.
        blocks: taps (module paths or decoder block numbers), in feature order.
        noise_draws: features averaged over this many noise draws.
        prompt: the text prompt (latent-diffusion models).
    """

    name: str
    image_size: int
    steps: list[int]
    blocks: list[int | str]
    description: str = ""
    checkpoint: str = ""
    noise_draws: int = 1
    prompt: str = ""


def feature_preset_names() -> list[str]:
    """Names of the feature presets shipped in `pipeline/data/preset_files/features/`, sorted."""
    return _yaml_names(PRESET_FILES / "features")


def load_feature_preset(name_or_path: str | Path) -> FeaturePreset:
    """Reads a feature preset by name (`preset_files/features/<name>.yaml`) or from a YAML file path.

    Raises:
        FileNotFoundError: naming the known feature presets when the name is unknown.
        ValueError: naming the file and key on unknown keys or wrong types.
    """
    path = _shipped_or_given(name_or_path, PRESET_FILES / "features")
    if not path.is_file():
        raise FileNotFoundError(
            f"no feature preset {str(name_or_path)!r} ({path} not found); known: {feature_preset_names()}"
        )
    return _read_settings_file(FeaturePreset, path)


def preset_for_dataset(classes: ClassInfo, name: str, document: dict | None = None) -> Preset:
    """A preset for a user's dataset: its classes, all its images unless `classes.json` says
    how many (its optional `train` and `test` counts), and the paper's steps, blocks and size.

    Args:
        classes: the dataset's class names and ignore label.
        name: a name for reports.
        document: the parsed `classes.json`, for its optional `train`/`test` counts.
    """
    document = document or {}
    return Preset(
        name=name,
        description=f"user dataset {name}",
        class_names=list(classes.names),
        num_classes=classes.num_classes,
        ignore_label=classes.ignore_label,
        train_images=int(document.get("train", 0)),
        test_images=int(document.get("test", 0)),
    )


@dataclasses.dataclass(frozen=True)
class FewShotPreset:
    """A few-shot benchmark's protocol (`pipeline/data/preset_files/fewshot/<name>.yaml`): how its classes split into
    folds and how many episodes a fold is scored on. The class names come from the dataset's own
    classes.json (80 to 920 of them), which must have `num_classes` names and this ignore label.

    Attributes:
        name: e.g. "coco_20i".
        folds, fold_layout: the split ("interleaved": fold f tests every folds-th class from f,
            COCO-20i and LVIS-92i; "blocks": contiguous blocks, PASCAL-5i).
        episodes: episodes per fold (the official: 1,000; LVIS-92i 2,300), seed: their seed.
        image_size: the episode size (DiffewS: 512).
        ignore_label, num_classes: what the dataset's classes.json must say.
        paper: DiffewS's published mIoU in percent (mean over folds), by setting.
    """

    name: str
    folds: int
    fold_layout: Literal["interleaved", "blocks"]
    episodes: int
    image_size: int
    ignore_label: int
    num_classes: int
    description: str = ""
    seed: int = 0
    paper: dict[str, float] = dataclasses.field(default_factory=dict)

    def check_dataset(self, classes: ClassInfo, where: str | Path) -> None:
        """Raises ValueError when a dataset's classes.json is not this benchmark's."""
        if classes.num_classes != self.num_classes or classes.ignore_label != self.ignore_label:
            raise ValueError(
                f"{where}: classes.json has {classes.num_classes} classes and ignore label {classes.ignore_label}, "
                f"but {self.name} has {self.num_classes} and {self.ignore_label}"
            )


def fewshot_preset_names() -> list[str]:
    """Names of the few-shot presets shipped in `pipeline/data/preset_files/fewshot/`, sorted."""
    return _yaml_names(PRESET_FILES / "fewshot")


def load_fewshot_preset(name_or_path: str | Path) -> FewShotPreset:
    """Reads a few-shot preset by name (`preset_files/fewshot/<name>.yaml`) or from a YAML file path.

    Raises:
        FileNotFoundError: naming the known few-shot presets when the name is unknown.
        ValueError: naming the file and key on unknown keys or wrong types.
    """
    path = _shipped_or_given(name_or_path, PRESET_FILES / "fewshot")
    if not path.is_file():
        raise FileNotFoundError(f"no few-shot preset {str(name_or_path)!r} ({path} not found); known: {fewshot_preset_names()}")
    return _read_settings_file(FewShotPreset, path)
