"""Figures: prediction grids, per-class IoU charts, training curves, picture grids.

Figures are drawn on a ``matplotlib.figure.Figure`` with its own Agg canvas, never through
``pyplot``, so nothing here touches matplotlib's global state (backend, current figure).
"""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from pipeline.pictures.masks import IGNORE_COLOUR, UNCERTAINTY_COLOURMAP, class_palette, colour_mask, uncertainty_image

logger = logging.getLogger(__name__)

_COLUMN_KEYS = ("image", "ground_truth", "prediction", "refined", "uncertainty")
_COLUMN_TITLES = {
    "image": "image",
    "ground_truth": "ground truth",
    "prediction": "prediction",
    "refined": "refined",
    "uncertainty": "uncertainty",
}


def save_prediction_grid(
    path: Path | str,
    rows: list[dict],
    class_names: list[str],
    ignore_label: int | None = 255,
) -> None:
    """Saves a figure with one row per image: image | ground truth | prediction | refined | uncertainty.

    A column is left out when no row has it (e.g. no ground truth for generated images); a
    row that lacks it gets an empty cell. The legend lists the classes that appear.

    Args:
        path: Where to write the PNG.
        rows: One dict per image with ``image`` (H, W, 3) uint8 and any of ``ground_truth``
            (H, W) int, ``prediction`` (H, W) int, ``refined`` (H, W) int (a refiner's output,
            beside the prediction it refined), ``uncertainty`` (H, W) float (one colour
            scale shared by all rows), and ``title`` (str, written beside the row).
        class_names: Name of each label, index = label value.
        ignore_label: Label shown white and listed as "ignore"; None when there is none.
    """
    if not rows:
        raise ValueError("need at least one row to draw")
    columns = [key for key in _COLUMN_KEYS if any(row.get(key) is not None for row in rows)]
    palette = class_palette(len(class_names))
    uncertainty_max = max(
        (float(row["uncertainty"].max()) for row in rows if row.get("uncertainty") is not None),
        default=0.0,
    )
    figure = Figure(figsize=(2.0 * len(columns) + 0.6, 2.0 * len(rows) + 1.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(rows), len(columns), squeeze=False)
    for row_index, row in enumerate(rows):
        _check_row(row_index, row)
        for column_index, key in enumerate(columns):
            cell = axes[row_index, column_index]
            cell.set_xticks([])
            cell.set_yticks([])
            if row.get(key) is not None:
                cell.imshow(
                    _cell_image(key, row[key], palette, ignore_label, uncertainty_max),
                    interpolation="nearest",
                )
            if row_index == 0:
                cell.set_title(_COLUMN_TITLES[key])
        axes[row_index, 0].set_ylabel(row.get("title", ""))
    if "uncertainty" in columns:
        scale = ScalarMappable(Normalize(0.0, uncertainty_max or 1.0), UNCERTAINTY_COLOURMAP)
        figure.colorbar(scale, ax=axes[:, -1], shrink=0.5, aspect=30)
    _add_class_legend(figure, rows, class_names, palette, ignore_label)
    figure.savefig(path, dpi=100)
    logger.info("saved a %d-row prediction grid to %s", len(rows), path)


def save_per_class_iou_chart(
    path: Path | str, per_class_iou: dict[str, float | None], title: str, mean_line: bool = True
) -> None:
    """Saves a horizontal bar chart of per-class IoU; classes without a value read "n/a".

    Args:
        path: Where to write the PNG.
        per_class_iou: Class name -> IoU in [0, 1], or None where the class is absent from
            both ground truth and prediction. Drawn top to bottom in the dict's order.
        title: Figure title.
        mean_line: Draw the mean of the known values as a dashed line.
    """
    if not per_class_iou:
        raise ValueError("per_class_iou is empty: nothing to draw")
    names = list(per_class_iou)
    values = [per_class_iou[name] for name in names]
    bad = {name: value for name, value in per_class_iou.items()
           if value is not None and not 0.0 <= value <= 1.0}
    if bad:
        raise ValueError(f"IoU values must lie in [0, 1] or be None, got {bad}")
    figure = Figure(figsize=(6.5, 0.32 * len(names) + 1.3), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    positions = np.arange(len(names))
    axes.barh(positions, [0.0 if value is None else value for value in values], color="tab:blue")
    for position, value in zip(positions, values):
        text = "n/a" if value is None else f"{100.0 * value:.1f}%"
        axes.text((value or 0.0) + 0.01, position, text, va="center", fontsize=8, zorder=3,
                  bbox=dict(facecolor="white", edgecolor="none", pad=1.0))
    known = [value for value in values if value is not None]  # the mean line is over these
    if known and mean_line:
        axes.axvline(float(np.mean(known)), color="tab:red", linestyle="--",
                     label=f"mean {100.0 * np.mean(known):.1f}%")
        axes.legend(loc="lower right", fontsize=8)
    axes.set_yticks(positions, names, fontsize=8)
    axes.invert_yaxis()  # first class at the top
    axes.set_xlim(0.0, 1.1)
    axes.set_xlabel("IoU")
    # Over the figure, not the axes: an axes title is centred on the axes, which long class names
    # push right, and constrained layout never moves it sideways, so a long one ran off the edge.
    figure.suptitle(_fitted_title(title, figure.get_figwidth(), fontsize=12), fontsize=12)
    figure.savefig(path, dpi=100)
    logger.info("saved a per-class IoU chart of %d classes to %s", len(names), path)


def _fitted_title(title: str, figure_inches: float, fontsize: float) -> str:
    """The title wrapped into lines no wider than the figure (constrained layout then makes room
    for their height, but it cannot shorten a line)."""
    characters = max(20, int(0.9 * figure_inches * 72 / (0.55 * fontsize)))  # a glyph: about 0.55 em wide
    return "\n".join(textwrap.wrap(title, characters))


def training_curve_rows(losses_per_member: list[list[float]]) -> list[dict[str, float]]:
    """Tabulates per-member epoch losses one row per epoch, one column per member (a DVC plot).

    Members that stopped earlier simply lack a value in later rows.

    Args:
        losses_per_member: Member m's mean training loss of each epoch it ran.

    Returns:
        Rows ``{"epoch": e, "member_0": loss, ...}`` for e = 0 .. the longest run - 1.
    """
    longest = max((len(losses) for losses in losses_per_member), default=0)
    rows = []
    for epoch in range(longest):
        row: dict[str, float] = {"epoch": epoch}
        for member, losses in enumerate(losses_per_member):
            if epoch < len(losses):
                row[f"member_{member}"] = float(losses[epoch])
        rows.append(row)
    return rows


def save_training_curves(
    path: Path | str, losses_per_member: list[list[float]], title: str
) -> None:
    """Saves a line chart of each member's mean training loss per epoch (log scale).

    Args:
        path: Where to write the PNG.
        losses_per_member: Member m's mean training loss of each epoch it ran.
        title: Figure title.
    """
    if not any(losses_per_member):
        raise ValueError("no training losses to draw")
    figure = Figure(figsize=(6.5, 4.0), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    colours = matplotlib.colormaps["tab10"].colors
    for member, losses in enumerate(losses_per_member):
        epochs = np.arange(1, len(losses) + 1)
        colour = colours[member % len(colours)]
        axes.plot(epochs, losses, color=colour, linewidth=1.2, label=f"member {member}")
        if len(losses):
            axes.plot(epochs[-1], losses[-1], "o", color=colour, markersize=4)  # where it stopped
    positive = all(value > 0 for losses in losses_per_member for value in losses)
    if positive:
        axes.set_yscale("log")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("epoch")
    axes.set_ylabel("mean cross-entropy")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, ncols=2, loc="upper right")
    figure.savefig(path, dpi=100)
    logger.info("saved training curves of %d members to %s", len(losses_per_member), path)


def save_segmenter_curve(path: Path | str, history: list[dict], chosen_epoch: int) -> None:
    """Saves the segmenter's training loss per epoch and, when it was validated, its validation
    mIoU on a second axis, with the chosen epoch marked.

    Args:
        path: Where to write the PNG.
        history: per epoch, ``epoch``, ``loss`` and optionally ``validation_miou``.
        chosen_epoch: the epoch whose weights were kept.
    """
    if not history:
        raise ValueError("no epochs to draw")
    figure = Figure(figsize=(6.5, 4.0), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    epochs = [entry["epoch"] + 1 for entry in history]  # drawn from 1
    axes.plot(epochs, [entry["loss"] for entry in history], color="tab:blue", label="training loss")
    axes.set_xlabel("epoch")
    axes.set_ylabel("mean cross-entropy", color="tab:blue")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    if "validation_miou" in history[0]:
        validation = axes.twinx()
        validation.plot(epochs, [entry["validation_miou"] for entry in history], color="tab:orange",
                        label="validation mIoU")
        validation.set_ylabel("validation mIoU (real labeled images)", color="tab:orange")
        validation.plot(chosen_epoch + 1, history[chosen_epoch]["validation_miou"], "o", color="tab:red")
    axes.axvline(chosen_epoch + 1, color="tab:red", linestyle="--", linewidth=1)
    axes.set_title(f"segmenter training (kept: epoch {chosen_epoch + 1})")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)

def _check_row(row_index: int, row: dict) -> None:
    """Checks that a grid row's arrays share the image's height and width."""
    image = row.get("image")
    if image is None or image.ndim != 3 or image.shape[2] != 3:
        shape = None if image is None else image.shape
        raise ValueError(f"row {row_index}: 'image' must be (H, W, 3) uint8, got {shape}")
    for key in _COLUMN_KEYS[1:]:
        if row.get(key) is not None and row[key].shape != image.shape[:2]:
            raise ValueError(
                f"row {row_index}: '{key}' has shape {row[key].shape}, image is {image.shape[:2]}"
            )


def _cell_image(
    key: str,
    array: np.ndarray,
    palette: np.ndarray,
    ignore_label: int | None,
    uncertainty_max: float,
) -> np.ndarray:
    """(H, W, 3) uint8 picture of one grid cell."""
    if key == "image":
        return array
    if key == "uncertainty":
        return uncertainty_image(array, max_value=uncertainty_max)
    return colour_mask(array, palette, ignore_label)


def _add_class_legend(
    figure: Figure,
    rows: list[dict],
    class_names: list[str],
    palette: np.ndarray,
    ignore_label: int | None,
) -> None:
    """A legend under the grid with the classes present in any ground truth or prediction."""
    present: set[int] = set()
    for row in rows:
        for key in ("ground_truth", "prediction", "refined"):
            if row.get(key) is not None:
                present.update(np.unique(row[key]).tolist())
    handles = [
        Patch(facecolor=palette[label] / 255.0, edgecolor="black", linewidth=0.5,
              label=class_names[label])
        for label in sorted(present) if label != ignore_label
    ]
    if ignore_label is not None and ignore_label in present:
        handles.append(Patch(facecolor=np.array(IGNORE_COLOUR) / 255.0, edgecolor="black",
                             linewidth=0.5, label="ignore"))
    if handles:
        # As many columns as fit the figure's width (8-point text: ~5.5 px a character at 100 dpi).
        entry_pixels = 30 + 5.5 * max(len(handle.get_label()) for handle in handles)
        fitting = int(figure.get_figwidth() * 100 // entry_pixels)
        figure.legend(handles=handles, loc="outside lower center", ncols=max(1, min(len(handles), 6, fitting)),
                      fontsize=8, frameon=False)


def save_picture_grid(
    path: Path | str,
    pictures: list[tuple[str, np.ndarray]],
    title: str,
    columns: int,
    markers: dict[int, tuple[int, int]] | None = None,
    colour_bar_label: str | None = None,
) -> None:
    """Saves titled pictures in a grid: RGB pictures as they are, 2-d maps with a colour bar.

    Args:
        path: Where to write the PNG.
        pictures: (title, uint8 (H, W, 3) picture or float (H, W) map) pairs, in reading order.
        title: the figure's title.
        columns: pictures per row.
        markers: picture position → (y, x) drawn there as a red cross (e.g. the reference pixel).
        colour_bar_label: label of the colour bar of the 2-d maps (shared scale −1..1 is not
            assumed: each map uses its own range).
    """
    rows = -(-len(pictures) // columns)
    figure = Figure(figsize=(2.2 * columns, 2.3 * rows + 0.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False)
    for cell in axes.ravel():
        cell.set_xticks([])
        cell.set_yticks([])
        cell.set_frame_on(False)
    markers = markers or {}
    for position, (cell, (name, picture)) in enumerate(zip(axes.ravel(), pictures)):
        if picture.ndim == 2:
            shown = cell.imshow(picture, cmap="viridis", interpolation="nearest")
            figure.colorbar(shown, ax=cell, shrink=0.8, label=colour_bar_label)
        else:
            cell.imshow(picture, interpolation="nearest")
        if position in markers:
            y, x = markers[position]
            cell.plot([x], [y], marker="+", color="red", markersize=12, markeredgewidth=2)
        cell.set_title(name, fontsize=9)
    figure.suptitle(title)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    logger.info("saved %d pictures to %s", len(pictures), path)



def save_selection_heatmap(path: Path | str, steps: list[int], taps: list[str], miou: dict[str, float],
                           chosen: tuple[list[int], list[str]]) -> None:
    """Validation mIoU of each (step, tap) alone as a heat map (steps × taps), the chosen ones framed."""
    rows = steps or [None]
    values = np.array([[miou[tap if step is None else f"t{step} {tap}"] for tap in taps] for step in rows])  # (T, taps)
    figure = Figure(figsize=(1.2 + 0.9 * len(taps), 1.4 + 0.5 * len(rows)), constrained_layout=True)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(values, cmap="viridis", aspect="auto")
    for row, step in enumerate(rows):
        for column, tap in enumerate(taps):
            framed = (step is None or step in chosen[0]) and tap in chosen[1]
            axes.text(column, row, f"{values[row, column]:.2f}", ha="center", va="center", fontsize=8,
                      color="white" if values[row, column] < values.mean() else "black",
                      fontweight="bold" if framed else "normal")
    axes.set_xticks(range(len(taps)), taps, rotation=45, ha="right", fontsize=7)
    axes.set_yticks(range(len(rows)), ["—" if step is None else f"t = {step}" for step in rows])
    axes.set_title("validation mIoU of each (step, tap) alone; bold: chosen", fontsize=9)
    figure.colorbar(image, ax=axes)
    figure.savefig(path, dpi=120)
