"""selection.json: the steps and taps `select` chose, how every candidate scored, and what
`train --selection` reads (apart from the selection code, so training does not depend on it)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Selection:
    """The chosen steps and taps, and how every candidate scored.

    Attributes:
        steps, taps: the choice, in the store's order.
        validation_miou: the proxy's cross-validated mIoU with the choice.
        single: "t<step> <tap>" → the proxy's cross-validated mIoU with that (step, tap) alone.
        order: each greedy round's addition and the mIoU after it ("start" for the first).
        per_class_best_tap: class name → the tap whose single (step, tap) scored it best.
        folds, pixels_per_image: how it was measured.
    """

    steps: list[int]
    taps: list[str]
    validation_miou: float
    single: dict[str, float]
    order: list[dict]
    per_class_best_tap: dict[str, str]
    folds: int
    pixels_per_image: int


def write_selection(selection: Selection, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dataclasses.asdict(selection), indent=1))


def read_selection(path: str | Path) -> tuple[list[int], list[str]]:
    """(steps, taps) of a `selection.json`; a ValueError naming the file if it is not one."""
    try:
        document = json.loads(Path(path).read_text())
        return [int(step) for step in document["steps"]], [str(tap) for tap in document["taps"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a selection.json written by `select` ({error})") from None
