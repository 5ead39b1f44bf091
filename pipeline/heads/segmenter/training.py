"""Training a segmenter on a labeled image folder (DatasetDDPM's second half), as the official code:
cross-entropy, Adam, no augmentation, the epoch with the best mIoU on real labeled images kept.

1. The training folder (e.g. `synthesize`'s output) and the validation folder (the real labeled
   training images) are checked before anything is written: labels everywhere, the same classes.
2. Each epoch shuffles with its own generator (seed, epoch), trains, then scores every
   validation image; the state after each epoch is saved (`.training/last.pt`), so a stopped
   run resumes at the next epoch with the same result.
3. The best epoch's weights become the segmenter (`model.safetensors`, `segmenter.json`), with
   its ONNX export (`model.onnx`) and the loss and validation curve (`training.json`, `training.png`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from pipeline.config import SegmenterSettings
from pipeline.data.folders import ClassInfo, find_class_info, list_images, load_example, require_label_maps
from pipeline.heads.segmenter.architectures import SIZE_MULTIPLES, build_network
from pipeline.heads.segmenter.export import export_onnx
from pipeline.heads.segmenter.segmenter import SEGMENTER_ONNX, Segmenter, save_segmenter
from pipeline.metrics import IoUAccumulator
from pipeline.pictures.figures import save_segmenter_curve
from pipeline.runtime.atomic import replaced_file
from pipeline.runtime.devices import pick_device, torch_threads
from pipeline.runtime.resume import load_run_state
from pipeline.sizes import as_shape

logger = logging.getLogger(__name__)

PROGRESS_FOLDER = ".training"


@dataclasses.dataclass(frozen=True)
class SegmenterSummary:
    out_dir: Path
    chosen_epoch: int
    validation_miou: float | None
    seconds: float


class LabeledFolder(torch.utils.data.Dataset):
    """A labeled image folder as (image float32 (3, H, W) in [-1, 1], labels int64 (H, W)) pairs,
    read from disk per item (memory does not grow with the folder)."""

    def __init__(self, records, size, classes: ClassInfo):
        self.records, self.size, self.classes = records, size, classes

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        image, labels = load_example(self.records[index], self.size, self.classes)
        return torch.from_numpy(image), torch.from_numpy(labels)


def train_segmenter(
    images_dir: str | Path,
    out_dir: str | Path,
    settings: SegmenterSettings,
    validation_dir: str | Path | None = None,
    show_progress: bool = True,
) -> SegmenterSummary:
    """Trains a segmenter on `images_dir` into `out_dir` (see the module docstring).

    Args:
        images_dir: a labeled folder (PNG/JPEG + same-stem `.npy`, `classes.json` beside or above).
        out_dir: where the segmenter goes; a stopped run there is resumed.
        settings: architecture, epochs, batch size, learning rate, size, seed, device.
        validation_dir: real labeled images: each epoch is scored on them and the best one kept
            (None: the last epoch).

    Raises:
        ValueError: a folder without labels or classes, classes that differ, too few images.
        FileExistsError: `out_dir` holds a run with other settings.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    # 1. Data, checked before anything is written.
    train_records, classes, size = _training_data(images_dir, settings)
    validation = _validation_data(validation_dir, classes, size) if validation_dir is not None else None
    device = pick_device(settings.device)
    torch.manual_seed(settings.seed)
    network = build_network(settings.architecture, classes.num_classes, width=settings.width).to(device)
    optimizer = torch.optim.Adam(network.parameters(), lr=settings.learning_rate)
    run = {"settings": dataclasses.asdict(settings), "images": str(images_dir), "image_count": len(train_records),
           "validation": None if validation_dir is None else str(validation_dir)}
    history = _resume(out_dir, run, network, optimizer)
    # 2. The epochs.
    dataset = LabeledFolder(train_records, size, classes)
    ignore = classes.ignore_label
    batches_per_epoch = len(dataset) // settings.batch_size
    bar = tqdm(total=settings.epochs * batches_per_epoch, initial=len(history) * batches_per_epoch,
               desc="train-segmenter", unit="batch", disable=not show_progress)
    with torch_threads(settings.threads), bar:
        for epoch in range(len(history), settings.epochs):
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=settings.batch_size, shuffle=True, drop_last=True,
                generator=torch.Generator().manual_seed(settings.seed * 100_003 + epoch),
            )
            network.train()
            losses = []
            flips = torch.Generator().manual_seed(settings.seed * 100_003 + epoch + 50_000)
            for images, labels in loader:  # (B, 3, H, W), (B, H, W)
                if settings.flips:
                    images, labels = _flip_half(images, labels, flips)
                logits = network(images.to(device))
                loss = F.cross_entropy(logits, labels.to(device), ignore_index=ignore)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                bar.update()
            entry = {"epoch": epoch, "loss": float(np.mean(losses))}
            if validation is not None:
                entry.update(_validate(network, validation, classes, device))
            history.append(entry)
            _save_progress(out_dir, run, network, optimizer, history)
            logger.info("segmenter epoch %d: loss %.4f%s", epoch, entry["loss"],
                        f", validation mIoU {entry['validation_miou']:.4f}" if validation is not None else "")
    # 3. The best epoch.
    return _finish(out_dir, run, history, settings, classes, size, device, started)


def _flip_half(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirrors a random half of a batch left-right, images (B, 3, H, W) and labels (B, H, W) alike."""
    chosen = torch.rand(len(images), generator=generator) < 0.5  # (B,)
    images, labels = images.clone(), labels.clone()
    images[chosen] = images[chosen].flip(-1)
    labels[chosen] = labels[chosen].flip(-1)
    return images, labels


def _training_data(images_dir, settings: SegmenterSettings) -> tuple[list, ClassInfo, int | list[int]]:
    records = list_images(images_dir)
    require_label_maps(records, images_dir)
    classes = find_class_info(images_dir)
    if classes is None:
        raise ValueError(f"{images_dir}: no classes.json beside the images or above them; it names the classes")
    if len(records) < settings.batch_size:
        raise ValueError(
            f"{images_dir} holds {len(records)} labeled images, fewer than one batch of {settings.batch_size} "
            "(short batches are dropped, as in the official code)"
        )
    if settings.image_size is not None:
        size = settings.image_size
    else:
        height, width = _own_size(records[0])  # the others are resized to it, as load_example does
        size = height if height == width else [height, width]
    multiple = SIZE_MULTIPLES[settings.architecture]
    if any(side % multiple for side in as_shape(size)):
        raise ValueError(f"the {settings.architecture} segmenter needs sides that are multiples of {multiple}, "
                         f"but the images are {as_shape(size)}: give an image_size that is")
    return records, classes, size


def _own_size(record) -> tuple[int, int]:
    """An image's (H, W), from its header alone."""
    with Image.open(record.image_path) as image:
        return image.size[::-1]


def _validation_data(validation_dir, classes: ClassInfo, size) -> list[tuple[torch.Tensor, np.ndarray]]:
    """The real labeled images, resized to the training size (a handful: kept in memory)."""
    records = list_images(validation_dir)
    require_label_maps(records, validation_dir)
    theirs = find_class_info(validation_dir)
    if theirs is not None and theirs.names != classes.names:
        raise ValueError(f"{validation_dir} has the classes {theirs.names}, the training images {classes.names}")
    pairs = []
    for record in records:
        image, labels = load_example(record, size, classes)
        pairs.append((torch.from_numpy(image), labels))
    return pairs


@torch.inference_mode()
def _validate(network, validation, classes: ClassInfo, device) -> dict:
    network.eval()
    accumulator = IoUAccumulator(classes.num_classes, classes.ignore_label)
    for image, labels in validation:
        predicted = network(image[None].to(device)).argmax(dim=1)[0].cpu().numpy()  # (H, W)
        accumulator.update(predicted, labels)
    per_class = accumulator.per_class_iou("paper")
    return {"validation_miou": round(accumulator.mean_iou("paper"), 6),
            "validation_per_class_iou": {name: (None if np.isnan(value) else round(float(value), 6))
                                         for name, value in zip(classes.names, per_class)}}


def _resume(out_dir: Path, run: dict, network, optimizer) -> list[dict]:
    """The epochs a stopped run finished (their state loaded into network and optimizer), or []."""
    state = load_run_state(out_dir / PROGRESS_FOLDER / "last.pt", run, "a segmenter training")
    if state is None:
        return []
    network.load_state_dict(state["network"])
    optimizer.load_state_dict(state["optimizer"])
    logger.info("resuming the segmenter's training after epoch %d", len(state["history"]) - 1)
    return state["history"]


def _save_progress(out_dir: Path, run: dict, network, optimizer, history: list[dict]) -> None:
    """The state after the last epoch, and the best epoch's weights so far."""
    progress = out_dir / PROGRESS_FOLDER
    progress.mkdir(parents=True, exist_ok=True)
    if _best_epoch(history) == history[-1]["epoch"]:
        with replaced_file(progress / "best.pt") as staging:
            torch.save(network.state_dict(), staging)
    with replaced_file(progress / "last.pt") as staging:
        torch.save({"run": run, "network": network.state_dict(), "optimizer": optimizer.state_dict(),
                    "history": history}, staging)


def _best_epoch(history: list[dict]) -> int:
    """The epoch with the highest validation mIoU (the first of equals), or the last without validation."""
    if "validation_miou" not in history[0]:
        return history[-1]["epoch"]
    return max(history, key=lambda entry: (entry["validation_miou"], -entry["epoch"]))["epoch"]


def _finish(out_dir: Path, run: dict, history, settings, classes: ClassInfo, size, device, started) -> SegmenterSummary:
    chosen = _best_epoch(history)
    network = build_network(settings.architecture, classes.num_classes, pretrained=False, width=settings.width)
    network.load_state_dict(torch.load(out_dir / PROGRESS_FOLDER / "best.pt", map_location="cpu"))
    network.eval()
    chosen_entry = history[chosen]
    record = {"chosen_epoch": chosen, "validation_miou": chosen_entry.get("validation_miou"), **run}
    with replaced_file(out_dir / "training.json") as staging:
        staging.write_text(json.dumps({"chosen_epoch": chosen, "epochs": history}, indent=1))
    save_segmenter_curve(out_dir / "training.png", history, chosen)
    export_onnx(network, size, out_dir / SEGMENTER_ONNX)
    save_segmenter(Segmenter(network, settings.architecture, classes.names, classes.ignore_label, size, record), out_dir)
    return SegmenterSummary(out_dir, chosen, chosen_entry.get("validation_miou"), time.perf_counter() - started)
