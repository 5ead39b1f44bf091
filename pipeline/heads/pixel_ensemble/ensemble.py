"""The ensemble of small pixel MLPs: the members' architecture, and saving and loading."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.runtime.atomic import replaced_folder
from pipeline.store.schema import FeatureDescription

logger = logging.getLogger(__name__)

ENSEMBLE_CONFIG = "ensemble.json"
ENSEMBLE_WEIGHTS = "members.safetensors"


@dataclasses.dataclass
class MemberLog:
    """How one member's training went."""

    epochs: int = 0
    iterations: int = 0
    stopped_early: bool = False
    epoch_mean_loss: list[float] = dataclasses.field(default_factory=list)


def paper_hidden_widths(num_classes: int) -> tuple[int, int]:
    """The paper's hidden layer widths: (128, 32) below 30 classes, (256, 128) from 30 on."""
    return (128, 32) if num_classes < 30 else (256, 128)


def make_pixel_classifier(
    feature_dim: int, num_classes: int, generator: torch.Generator, widths: Sequence[int] | None = None
) -> torch.nn.Sequential:
    """One member: Linear → ReLU → BatchNorm → Linear → ReLU → BatchNorm → Linear.

    Linear weights are drawn from N(0, 0.02) with `generator`, biases are 0 and the BatchNorm
    layers keep PyTorch's defaults, as in the official implementation. `widths`: the two hidden
    widths (`TrainSettings.hidden_widths`); None: `paper_hidden_widths`.
    """
    first, second = paper_hidden_widths(num_classes) if widths is None else widths
    model = torch.nn.Sequential(
        torch.nn.Linear(feature_dim, first),
        torch.nn.ReLU(),
        torch.nn.BatchNorm1d(first),
        torch.nn.Linear(first, second),
        torch.nn.ReLU(),
        torch.nn.BatchNorm1d(second),
        torch.nn.Linear(second, num_classes),
    )
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            with torch.no_grad():
                layer.weight.normal_(0.0, 0.02, generator=generator)
                layer.bias.zero_()
    return model


@dataclasses.dataclass
class Ensemble:
    """Trained members with what they need to be used and checked later.

    Attributes:
        members: the MLPs, in eval mode.
        feature_dim: D, the pixel feature width they expect.
        class_names: K names; label k is class_names[k].
        ignore_label: the label of unannotated pixels.
        features: the features they were trained on (source, steps, taps, size).
        logs: one MemberLog per member.
    """

    members: list[torch.nn.Module]
    feature_dim: int
    class_names: list[str]
    ignore_label: int
    features: FeatureDescription
    logs: list[MemberLog]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def save_ensemble(ensemble: Ensemble, out_dir: str | Path) -> None:
    """Writes `ensemble.json` and `members.safetensors` into `out_dir`, atomically: a reader
    sees the old ensemble or the new one, never half of one."""
    tensors = {
        f"member_{index}.{name}": tensor.detach().cpu().contiguous()
        for index, member in enumerate(ensemble.members)
        for name, tensor in member.state_dict().items()
    }
    config = {
        "members": len(ensemble.members),
        "feature_dim": ensemble.feature_dim,
        "hidden_widths": [ensemble.members[0][0].out_features, ensemble.members[0][3].out_features],
        "class_names": ensemble.class_names,
        "ignore_label": ensemble.ignore_label,
        "features": dataclasses.asdict(ensemble.features),
        "logs": [dataclasses.asdict(log) for log in ensemble.logs],
    }
    with replaced_folder(Path(out_dir)) as staging:
        save_file(tensors, staging / ENSEMBLE_WEIGHTS)
        (staging / ENSEMBLE_CONFIG).write_text(json.dumps(config, indent=1))


def load_ensemble(ensemble_dir: str | Path) -> Ensemble:
    """Reads an ensemble written by `save_ensemble`.

    Raises:
        FileNotFoundError: when the folder has no ensemble.
        ValueError: when its files do not fit together.
    """
    ensemble_dir = Path(ensemble_dir)
    config_path, weights_path = ensemble_dir / ENSEMBLE_CONFIG, ensemble_dir / ENSEMBLE_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"no trained ensemble in {ensemble_dir} (expected {ENSEMBLE_CONFIG} and {ENSEMBLE_WEIGHTS})")
    config = json.loads(config_path.read_text())
    try:
        features = FeatureDescription(**config["features"])
    except TypeError:
        raise ValueError(
            f"{config_path} was written by an older segcache (features named by block numbers, not taps); "
            "re-extract its stores and train it again"
        ) from None
    tensors = load_file(weights_path)
    members = []
    for index in range(config["members"]):
        model = make_pixel_classifier(
            config["feature_dim"], len(config["class_names"]), torch.Generator(), config["hidden_widths"]
        )
        prefix = f"member_{index}."
        state = {name[len(prefix) :]: tensor for name, tensor in tensors.items() if name.startswith(prefix)}
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            raise ValueError(f"{weights_path}: member {index} does not match {config_path}: {error}") from None
        members.append(model.eval())
    logs = [MemberLog(**log) for log in config["logs"]]
    return Ensemble(members, config["feature_dim"], config["class_names"], config["ignore_label"], features, logs)

