"""DiffewS's episodic fine-tuning: a diffusion UNet learns to segment a query given supports.

1. The backbone is a pixel-space `UNet2DModel` (`load_backbone`: the image is the model's
   input, the mask map its target) or a latent-diffusion folder (`load_latent_diffusion` with
   the empty prompt: images and mask maps VAE-encoded, a posterior sample in training, the
   mean at evaluation; the VAE frozen; the prompt's embedding as the text conditioning).
2. Episodes come from the fold's training (base) classes only: the test (novel) classes are
   never seen. Each step draws its shot count k in 1..max_training_shots and `batch_size`
   episodes of k shots from a generator seeded by (seed, step), so a resumed run draws what an
   uninterrupted one does.
3. Each step: the `FewShotUNet` forward (supports recorded, query fused), MSE to the query's
   mask map, AdamW with a linear decay to 0 over `steps`, the gradient norm clipped. The whole
   UNet and the support stem `conv_in_ref` train.
4. Every `SAVE_EVERY` steps and at the end the state (model, optimizer, scheduler, losses, the
   run's settings and data) goes to `.training/state.pt`; a rerun resumes from it, and a run
   with other settings or data is refused.
5. The outputs: `model.safetensors` (the `FewShotUNet` state dict), `fewshot.json` (how to
   rebuild it: backbone kind, checkpoint, UNet config, classes, fold, size, settings),
   `prompt_embeds.safetensors` (latent only), `loss.csv` and `loss.png`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import safetensors.torch
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from pipeline.config import FewShotSettings
from pipeline.data.folders import ClassInfo, ImageRecord, find_class_info, list_images
from pipeline.fewshot.episodes import (
    ClassFold,
    ClassIndex,
    EpisodeInputs,
    check_episode_pools,
    dataset_fold,
    index_classes,
    load_episode,
    make_episodes,
    named_fold,
)
from pipeline.fewshot.masks import decode_latents, decode_masks, encode_latents, masks_to_maps
from pipeline.fewshot.model import FewShotUNet, add_fine_attention, freeze_except, training_loss
from pipeline.runtime.atomic import replaced_file
from pipeline.runtime.devices import pick_device, torch_threads
from pipeline.runtime.hashing import file_sha256
from pipeline.runtime.resume import load_run_state
from pipeline.sizes import as_shape
from pipeline.sources.checkpoints import diffusers_weights_file, load_backbone, plain_config
from pipeline.sources.latent import is_latent_diffusion_folder, load_latent_diffusion

logger = logging.getLogger(__name__)

PROGRESS_FOLDER = ".training"
STATE_FILE = "state.pt"
SAVE_EVERY = 50  # steps between saved states (and one at the end)
MODEL_FILE = "model.safetensors"
RECORD_FILE = "fewshot.json"
PROMPT_FILE = "prompt_embeds.safetensors"
LOSS_TABLE = "loss.csv"
LOSS_PICTURE = "loss.png"
PIXEL, LATENT = "pixel", "latent"
IMAGE_CHANNELS = 3  # RGB images, and mask maps repeated to as many channels
# Settings that do not change the trained weights: a run may resume with other values of them.
NOT_TRAINING = ("shots", "episodes", "threshold", "device", "threads")
ClassChoice = Literal["test", "train"]


@dataclasses.dataclass(frozen=True)
class FewShotBackbone:
    """What a few-shot model is built on.

    Attributes:
        kind: "pixel" (a `UNet2DModel` on images) or "latent" (a `UNet2DConditionModel` on VAE latents).
        unet: the UNet, float32, on the CPU.
        vae: the frozen VAE (latent only, else None).
        prompt_embeds: float32 (1, L, D), the empty prompt's embedding (latent only, else None).
        checkpoint: the checkpoint file or folder, resolved.
        checkpoint_sha256: digest of its weights (for a latent folder: of the UNet's and VAE's).
        vae_sha256: digest of the VAE's weights file (latent only), checked when it is reloaded.
    """

    kind: str
    unet: torch.nn.Module
    vae: AutoencoderKL | None
    prompt_embeds: torch.Tensor | None
    checkpoint: str
    checkpoint_sha256: str
    vae_sha256: str | None

    @property
    def pixels_per_input(self) -> int:
        """Image pixels per model-input pixel along a side: 1, or the VAE's downsampling factor."""
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)


@dataclasses.dataclass(frozen=True)
class EpisodeData:
    """A folder's images indexed for the episodes of one class choice of a fold.

    Attributes:
        records: the images by name.
        classes: the dataset's classes (`classes.json`).
        fold: the class fold.
        episode_classes: the classes episodes are drawn from (the fold's train or test classes).
        index: which images hold which of them, at `size`.
        size: S or [H, W], the episode size.
    """

    records: dict[str, ImageRecord]
    classes: ClassInfo
    fold: ClassFold
    episode_classes: tuple[int, ...]
    index: ClassIndex
    size: int | list[int]


class ModelInputs(NamedTuple):
    """A batch of episodes in the model's space (C: 3 in pixel space, the latent channels else).

    Attributes:
        query: (B, C, h, w).
        support_images: (B, N, C, h, w).
        support_maps: (B, N, C, h, w), the supports' mask maps (or their latents).
        target: (B, C, h, w), the query's mask map (or its latent).
    """

    query: torch.Tensor
    support_images: torch.Tensor
    support_maps: torch.Tensor
    target: torch.Tensor


@dataclasses.dataclass(frozen=True)
class FewShotTrainingSummary:
    """What `train_fewshot` did: where, how many steps, the last step's loss, how long."""

    out_dir: Path
    steps: int
    final_loss: float
    seconds: float


@dataclasses.dataclass(frozen=True)
class FewShotModel:
    """A trained few-shot model as `load_fewshot_model` rebuilds it (on the CPU, eval mode).

    Attributes:
        model: the `FewShotUNet`.
        vae: the frozen VAE of a latent model, else None.
        prompt_embeds: float32 (1, L, D) of a latent model, else None.
        record: `fewshot.json`.
    """

    model: FewShotUNet
    vae: AutoencoderKL | None
    prompt_embeds: torch.Tensor | None
    record: dict


def load_fewshot_backbone(checkpoint: str | Path, prompt_embeds: str | Path | None = None) -> FewShotBackbone:
    """Loads a pixel-space UNet checkpoint or a latent-diffusion folder (see the module docstring).

    Args:
        checkpoint: anything `load_backbone` reads, or a latent-diffusion folder (unet/, vae/,
            scheduler/, and text_encoder/ + tokenizer/ to encode the empty prompt).
        prompt_embeds: for a latent folder without a text encoder, a file holding the empty
            prompt's (1, L, D) embedding.

    Raises:
        FileNotFoundError: no such checkpoint.
        ValueError: an unreadable checkpoint, or a latent folder missing a part (its VAE...).
    """
    path = Path(checkpoint).resolve()
    if path.is_dir() and is_latent_diffusion_folder(path):
        latent = load_latent_diffusion(path, prompt="", prompt_embeds=prompt_embeds)
        latent.vae.requires_grad_(False)  # frozen, as in the paper
        vae_sha256 = file_sha256(diffusers_weights_file(path / "vae"))
        # A plain copy: the embedding may have been computed in inference mode, which autograd refuses.
        prompt = latent.prompt_embeds.clone()
        return FewShotBackbone(LATENT, latent.unet, latent.vae, prompt, str(path),
                               latent.checkpoint_sha256, vae_sha256)
    backbone = load_backbone(path)
    return FewShotBackbone(PIXEL, backbone.unet, None, None, str(path), backbone.checkpoint_sha256, None)


def episode_size(backbone: FewShotBackbone, image_size: int | None) -> int | list[int]:
    """The episode size in image pixels: `image_size`, else the UNet's sample size (× the VAE's factor).

    Raises:
        ValueError: a size the UNet cannot take (its sides must halve at every level).
    """
    if image_size is not None:
        size = image_size
    else:
        sample = backbone.unet.config.sample_size
        size = sample * backbone.pixels_per_input if isinstance(sample, int) else [side * backbone.pixels_per_input for side in sample]
    multiple = backbone.pixels_per_input * 2 ** (len(backbone.unet.config.block_out_channels) - 1)
    if any(side % multiple for side in as_shape(size)):
        raise ValueError(f"the {backbone.kind} UNet needs image sides that are multiples of {multiple}, got {size}: "
                         "give an image_size that is")
    return size


def episode_data(
    images_dir: str | Path, settings: FewShotSettings, size: int | Sequence[int], which: ClassChoice, shots: int
) -> EpisodeData:
    """Lists and indexes a folder's images for episodes of the fold's `which` classes.

    Raises:
        ValueError: no classes.json, a fold with no class of that choice, a class held by
            fewer than shots + 1 images at `size` (naming it).
    """
    records = list_images(images_dir)
    classes = find_class_info(images_dir)
    if classes is None:
        raise ValueError(f"{images_dir}: no classes.json beside the images or above them; it names the classes")
    if which not in ("train", "test"):
        raise ValueError(f"classes must be 'train' or 'test', got {which!r}")
    if settings.novel_classes:
        fold = named_fold(classes, settings.novel_classes)
    else:
        fold = dataset_fold(classes, settings.folds, settings.fold, layout=settings.fold_layout)
    chosen = fold.train_classes if which == "train" else fold.test_classes
    if not chosen:
        raise ValueError(f"fold {settings.fold} of {settings.folds} has no {which} classes (all classes: {fold.test_classes})")
    index = index_classes(records, chosen, min_pixels=settings.min_pixels, size=size)
    check_episode_pools(index, chosen, shots, classes.names)
    return EpisodeData({record.name: record for record in records}, classes, fold, chosen, index,
                       size if isinstance(size, int) else list(size))


def model_inputs(
    episodes: Sequence[EpisodeInputs], vae: AutoencoderKL | None, device: torch.device,
    generator: torch.Generator | None = None,
) -> ModelInputs:
    """Stacks loaded episodes (all of N shots and one size) into the model's space.

    Args:
        episodes: `load_episode`'s outputs.
        vae: a latent model's VAE (images and mask maps are encoded), or None (pixel space).
        device: where the tensors go.
        generator: a CPU generator: latents are posterior samples (training); None: the means.
    """
    query = torch.stack([episode.query_image for episode in episodes])  # (B, 3, H, W)
    target = masks_to_maps(torch.stack([episode.query_mask for episode in episodes]), IMAGE_CHANNELS)  # (B, 3, H, W)
    support_images = torch.stack([episode.support_images for episode in episodes])  # (B, N, 3, H, W)
    support_maps = masks_to_maps(torch.stack([episode.support_masks for episode in episodes]), IMAGE_CHANNELS)
    if vae is None:
        return ModelInputs(query.to(device), support_images.to(device), support_maps.to(device), target.to(device))
    batch, shots = support_images.shape[:2]
    # One VAE call for everything, in a fixed order, so a seeded generator gives the same samples.
    pixels = torch.cat([query, target, support_images.flatten(0, 1), support_maps.flatten(0, 1)]).to(device)
    latents = encode_latents(vae, pixels, generator)  # (2B + 2BN, C_latent, h, w)
    query_latents, target_latents, support_latents, map_latents = latents.split([batch, batch, batch * shots, batch * shots])
    return ModelInputs(query_latents, support_latents.unflatten(0, (batch, shots)),
                       map_latents.unflatten(0, (batch, shots)), target_latents)


def predict_masks(
    model: FewShotUNet, vae: AutoencoderKL | None, prompt_embeds: torch.Tensor | None, inputs: ModelInputs,
    threshold: float,
) -> torch.Tensor:
    """The queries' predicted masks, bool (B, H, W) at the image size (latent maps decoded first)."""
    prediction = model(inputs.query, inputs.support_images, inputs.support_maps, encoder_hidden_states=prompt_embeds)
    maps = prediction if vae is None else decode_latents(vae, prediction)  # (B, 3, H, W)
    return decode_masks(maps, threshold)


def train_fewshot(
    checkpoint: str | Path,
    images_dir: str | Path,
    out_dir: str | Path,
    settings: FewShotSettings,
    show_progress: bool = True,
    prompt_embeds: str | Path | None = None,
) -> FewShotTrainingSummary:
    """Fine-tunes a diffusion UNet on episodes of the fold's training classes (module docstring).

    Args:
        checkpoint: a pixel-space UNet (`load_backbone`) or a latent-diffusion folder.
        images_dir: a labeled folder (PNG/JPEG + same-stem `.npy`, `classes.json` beside or above).
        out_dir: where the model goes; a stopped run there is resumed.
        settings: folds, fold, steps, batch size, shots, optimiser, size, seed, device, threads.
        show_progress: a progress bar over the steps.
        prompt_embeds: the empty prompt's embedding file, for a latent folder without a text encoder.

    Raises:
        ValueError: an unreadable backbone, no classes.json, a training class too few images hold.
        FileExistsError: `out_dir` holds a run with other settings or data (naming what differs).
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    # 1. Backbone and data, checked before anything is written.
    backbone = load_fewshot_backbone(checkpoint, prompt_embeds)
    size = episode_size(backbone, settings.image_size)
    data = episode_data(images_dir, settings, size, "train", settings.max_training_shots)
    trained_names = {data.classes.names[label] for label in data.episode_classes}
    if set(settings.class_weights) - trained_names:
        raise ValueError(f"class_weights name {sorted(set(settings.class_weights) - trained_names)}, which are not "
                         f"training classes of {images_dir} (those are {sorted(trained_names)})")
    device = pick_device(settings.device)
    unet = random_copy(backbone.unet, settings.seed) if settings.random_init else backbone.unet
    if settings.fine_attention:
        add_fine_attention(unet, settings.fine_attention, model_side(size, backbone.pixels_per_input))
    model = FewShotUNet(unet).to(device).train()
    freeze_except(model, settings.trainable)
    vae = backbone.vae.to(device) if backbone.vae is not None else None
    text = backbone.prompt_embeds.to(device) if backbone.prompt_embeds is not None else None
    trained = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: 1 - done / settings.steps)
    run = run_identity(backbone, data, settings)
    losses = _resume(out_dir, run, model, optimizer, scheduler)
    # 2. The steps, each from its own seeded draws.
    bar = tqdm(total=settings.steps, initial=len(losses), desc="fewshot-train", unit="step", disable=not show_progress)
    with torch_threads(settings.threads), bar:
        for step in range(len(losses), settings.steps):
            inputs = training_inputs(step, settings, data, vae, device)
            prediction = model(inputs.query, inputs.support_images, inputs.support_maps, encoder_hidden_states=text)
            loss = training_loss(prediction, inputs.target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, settings.grad_clip)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.item()))
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if (step + 1) % SAVE_EVERY == 0 or step + 1 == settings.steps:
                _save_state(out_dir, run, model, optimizer, scheduler, losses)
    # 3. The outputs.
    _write_outputs(out_dir, model, backbone, data, settings, losses)
    logger.info("few-shot training done: %d steps, final loss %.4f, %s", len(losses), losses[-1], out_dir)
    return FewShotTrainingSummary(out_dir, len(losses), losses[-1], time.perf_counter() - started)


def random_copy(unet: torch.nn.Module, seed: int) -> torch.nn.Module:
    """The same UNet with diffusers' fresh random weights (seeded, the global random state untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return type(unet).from_config(unet.config)


def model_side(size: int | Sequence[int], pixels_per_input: int) -> int:
    """The model input's side (the first, for H×W) at an episode size in image pixels."""
    return as_shape(size)[0] // pixels_per_input


def training_inputs(
    step: int, settings: FewShotSettings, data: EpisodeData, vae: AutoencoderKL | None, device: torch.device
) -> ModelInputs:
    """Step `step`'s batch: k shots in 1..max_training_shots, `batch_size` episodes of the training
    classes, latent samples, all from draws seeded by (seed, step) alone."""
    draws = np.random.default_rng((settings.seed, step))
    shots = int(draws.integers(1, settings.max_training_shots + 1))
    weights = ([settings.class_weights.get(data.classes.names[label], 1.0) for label in data.episode_classes]
               if settings.class_weights else None)
    episodes = make_episodes(data.index, data.episode_classes, shots, count=settings.batch_size,
                             seed=int(draws.integers(2**32)), names=data.classes.names, class_weights=weights)
    loaded = [load_episode(episode, data.records, data.classes, data.size) for episode in episodes]
    latent_generator = torch.Generator().manual_seed(int(draws.integers(2**32)))
    return model_inputs(loaded, vae, device, latent_generator)


def run_identity(backbone: FewShotBackbone, data: EpisodeData, settings: FewShotSettings) -> dict:
    """What makes a run: a saved state resumes only a run with the same (JSON-serialisable)."""
    prompt_sha256 = None
    if backbone.prompt_embeds is not None:
        prompt_sha256 = hashlib.sha256(backbone.prompt_embeds.contiguous().numpy().tobytes()).hexdigest()
    training_settings = {key: value for key, value in dataclasses.asdict(settings).items() if key not in NOT_TRAINING}
    return {
        "settings": training_settings,
        "checkpoint": backbone.checkpoint,
        "checkpoint_sha256": backbone.checkpoint_sha256,
        "prompt_sha256": prompt_sha256,
        "images": sorted(data.records),
        "classes": list(data.classes.names),
        "image_size": data.size,
    }


def _resume(out_dir: Path, run: dict, model: FewShotUNet, optimizer, scheduler) -> list[float]:
    """The losses of the steps a stopped run finished (their state loaded), or []."""
    state = load_run_state(out_dir / PROGRESS_FOLDER / STATE_FILE, run, "a few-shot training", _with_new_settings)
    if state is None:
        return []
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    logger.info("resuming the few-shot training after step %d of %d", len(state["losses"]), run["settings"]["steps"])
    return list(state["losses"])


def _with_new_settings(saved: dict) -> dict:
    """A run record saved before some settings existed, with those at their defaults (a default
    trains what the run trained before the setting was added)."""
    defaults = {key: value for key, value in dataclasses.asdict(FewShotSettings()).items() if key not in NOT_TRAINING}
    return {**saved, "settings": {**defaults, **saved["settings"]}}


def _save_state(out_dir: Path, run: dict, model: FewShotUNet, optimizer, scheduler, losses: list[float]) -> None:
    """The state after the last step, written atomically (a kill leaves the previous one)."""
    with replaced_file(out_dir / PROGRESS_FOLDER / STATE_FILE) as staging:
        torch.save({"run": run, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "losses": losses, "step": len(losses)}, staging)


def _write_outputs(
    out_dir: Path, model: FewShotUNet, backbone: FewShotBackbone, data: EpisodeData, settings: FewShotSettings,
    losses: list[float],
) -> None:
    """model.safetensors, prompt_embeds.safetensors (latent), fewshot.json, loss.csv, loss.png."""
    weights = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    with replaced_file(out_dir / MODEL_FILE) as staging:
        safetensors.torch.save_file(weights, staging)
    if backbone.prompt_embeds is not None:
        with replaced_file(out_dir / PROMPT_FILE) as staging:
            safetensors.torch.save_file({"prompt_embeds": backbone.prompt_embeds.contiguous()}, staging)
    record = training_record(model, backbone, data, settings, losses)
    with replaced_file(out_dir / RECORD_FILE) as staging:
        staging.write_text(json.dumps(record, indent=1))
    with replaced_file(out_dir / LOSS_TABLE) as staging:
        staging.write_text("step,loss\n" + "".join(f"{step + 1},{loss:.6g}\n" for step, loss in enumerate(losses)))
    with replaced_file(out_dir / LOSS_PICTURE) as staging:
        save_loss_curve(staging, losses)


def training_record(
    model: FewShotUNet, backbone: FewShotBackbone, data: EpisodeData, settings: FewShotSettings, losses: list[float]
) -> dict:
    """fewshot.json: enough to rebuild the model (`load_fewshot_model`) and to know what it saw."""
    names = data.classes.names
    return {
        "backbone": {
            "kind": backbone.kind,
            "checkpoint": backbone.checkpoint,
            "checkpoint_sha256": backbone.checkpoint_sha256,
            "vae_sha256": backbone.vae_sha256,
            "unet_class": type(backbone.unet).__name__,
            "unet_config": plain_config(backbone.unet.config),
        },
        "max_support_tokens": model.max_support_tokens,
        "timestep": model.timestep,
        "classes": {"names": list(names), "ignore_label": data.classes.ignore_label},
        "fold": {
            "folds": data.fold.folds, "fold": data.fold.fold,
            "train_classes": [names[label] for label in data.fold.train_classes],
            "train_class_indices": list(data.fold.train_classes),
            "test_classes": [names[label] for label in data.fold.test_classes],
            "test_class_indices": list(data.fold.test_classes),
        },
        "image_size": data.size,
        "images": len(data.records),
        "settings": dataclasses.asdict(settings),
        "steps": len(losses),
        "final_loss": losses[-1],
    }


def save_loss_curve(path: Path, losses: list[float]) -> None:
    """The training loss per step (light) and its running mean over 20 steps, as a PNG."""
    figure = Figure(figsize=(6.5, 4.0), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    steps = np.arange(1, len(losses) + 1)
    axes.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=1, label="per step")
    window = min(20, len(losses))
    running = np.convolve(losses, np.ones(window) / window, mode="valid")  # (steps - window + 1,)
    axes.plot(steps[window - 1:], running, color="tab:blue", label=f"mean of {window} steps")
    axes.set_xlabel("step")
    axes.set_ylabel("MSE to the query's mask map")
    axes.set_yscale("log")
    axes.grid(alpha=0.3)
    axes.legend()
    axes.set_title("few-shot training (DiffewS)")
    figure.savefig(path, dpi=100, format="png")  # the staging name has no .png suffix


def load_fewshot_model(folder: str | Path) -> FewShotModel:
    """Rebuilds a trained few-shot model from `fewshot.json` and `model.safetensors` (and, for a
    latent model, the VAE from the recorded checkpoint folder, its digest checked).

    Raises:
        FileNotFoundError: the folder lacks fewshot.json or model.safetensors.
        ValueError: a VAE whose weights differ from the training's, or weights that do not fit.
    """
    folder = Path(folder)
    for name in (RECORD_FILE, MODEL_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} holds no {name}: not a few-shot model folder (fewshot-train writes one)")
    record = json.loads((folder / RECORD_FILE).read_text())
    backbone = record["backbone"]
    unet_class = UNet2DConditionModel if backbone["kind"] == LATENT else UNet2DModel
    fine_attention = record["settings"].get("fine_attention") or []
    with torch.device("meta"):  # no random initialisation: every weight comes from the file
        unet = unet_class.from_config(backbone["unet_config"])
        if fine_attention:
            add_fine_attention(unet, fine_attention, model_side(record["image_size"], 1))
        model = FewShotUNet(unet, record["max_support_tokens"], record["timestep"])
    # Copied: tensors at arbitrary file offsets can round differently in some CPU kernels; and
    # float32, as training wrote them (a committed demo model is stored in float16 to halve it).
    weights = {name: tensor.to(torch.float32, copy=True) if tensor.is_floating_point() else tensor.clone()
               for name, tensor in safetensors.torch.load_file(folder / MODEL_FILE).items()}
    try:
        model.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as error:
        raise ValueError(f"{folder / MODEL_FILE} does not fit the UNet of {folder / RECORD_FILE}: {error}") from error
    vae = prompt_embeds = None
    if backbone["kind"] == LATENT:
        vae = _load_recorded_vae(Path(backbone["checkpoint"]), backbone["vae_sha256"])
        prompt_embeds = safetensors.torch.load_file(folder / PROMPT_FILE)["prompt_embeds"]
    return FewShotModel(model.eval(), vae, prompt_embeds, record)


def _load_recorded_vae(checkpoint: Path, sha256: str) -> AutoencoderKL:
    """The VAE of a latent checkpoint folder, refused if its weights are not the training's."""
    vae_folder = checkpoint / "vae"
    if not vae_folder.is_dir():
        raise ValueError(f"the few-shot model's VAE {vae_folder} is gone: the model needs its checkpoint folder")
    found = file_sha256(diffusers_weights_file(vae_folder))
    if found != sha256:
        raise ValueError(f"{vae_folder}'s weights (sha256 {found[:12]}) are not those the model was trained with ({sha256[:12]})")
    vae = AutoencoderKL.from_pretrained(vae_folder, local_files_only=True).eval()
    return vae.requires_grad_(False)
