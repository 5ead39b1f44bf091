"""DiffewS's episodic fine-tuning and evaluation on tiny random UNets: the loss falls, the outputs
reload to the same predictions, a stopped run resumes to the same weights, only base classes are
trained on, the novel ones scored, a latent folder round trip, and the refusals."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import safetensors.torch
import torch

from conftest import tiny_attention_unet, write_image_folder
from pipeline.config import FewShotSettings
from pipeline.data.folders import ClassInfo, list_images
from pipeline.fewshot import training
from pipeline.fewshot.episodes import load_episode, make_episodes
from pipeline.fewshot.evaluation import evaluate_fewshot, predict_episode
from pipeline.fewshot.model import FewShotUNet
from pipeline.fewshot.training import load_fewshot_model, train_fewshot
from pipeline.sources.tiny_unet import save_tiny_latent_diffusion

NAMES = ["background", "disc", "square"]  # with folds=2, fold 0 tests disc (1) and trains on square (2)
SETTINGS = FewShotSettings(
    folds=2, fold=0, shots=1, max_training_shots=2, episodes=4, steps=30, batch_size=2, learning_rate=2e-3,
    image_size=16, seed=0, device="cpu", threads=1,
)


def labeled_folder(folder, count=6, names=NAMES, seed=0):
    write_image_folder(folder, count=count, size=32, seed=seed)
    (folder / "classes.json").write_text(json.dumps({"names": names, "ignore_label": 255}))
    return folder


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A pixel UNet checkpoint, a labeled folder, and one 30-step training of it (its episodes' classes recorded)."""
    root = tmp_path_factory.mktemp("fewshot")
    tiny_attention_unet().save_pretrained(root / "unet")
    labeled_folder(root / "images")
    drawn = []

    def recording(*args, **kwargs):
        episodes = make_episodes(*args, **kwargs)
        drawn.extend(episodes)
        return episodes

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "make_episodes", recording)
        summary = train_fewshot(root / "unet", root / "images", root / "model", SETTINGS, show_progress=False)
    return root, summary, drawn


def test_training_lowers_the_loss_and_writes_its_outputs(workspace):
    root, summary, _ = workspace
    model_dir = root / "model"
    for name in ("model.safetensors", "fewshot.json", "loss.csv", "loss.png", ".training/state.pt"):
        assert (model_dir / name).is_file(), name
    losses = np.loadtxt(model_dir / "loss.csv", delimiter=",", skiprows=1)[:, 1]  # (steps,)
    assert len(losses) == summary.steps == 30 and summary.final_loss == pytest.approx(losses[-1], rel=1e-5)
    assert losses[-5:].mean() < 0.5 * losses[:5].mean()
    record = json.loads((model_dir / "fewshot.json").read_text())
    assert record["backbone"]["kind"] == "pixel" and len(record["backbone"]["checkpoint_sha256"]) == 64
    assert record["fold"]["train_classes"] == ["square"] and record["fold"]["test_classes"] == ["disc"]
    assert record["image_size"] == 16 and record["steps"] == 30 and record["settings"]["learning_rate"] == 2e-3


def test_training_draws_only_the_folds_base_classes(workspace):
    _, _, drawn = workspace
    assert len(drawn) == SETTINGS.steps * SETTINGS.batch_size
    assert {episode.class_index for episode in drawn} == {2}
    assert {len(episode.supports) for episode in drawn} == {1, 2}  # k drawn in 1..max_training_shots


def test_the_saved_model_reloads_to_the_same_predictions(workspace):
    root, _, _ = workspace
    loaded = load_fewshot_model(root / "model")
    state = torch.load(root / "model" / ".training" / "state.pt", weights_only=False)["model"]
    for name, tensor in loaded.model.state_dict().items():
        torch.testing.assert_close(tensor, state[name], rtol=0, atol=0)
    rebuilt = FewShotUNet(tiny_attention_unet())
    rebuilt.load_state_dict(state)
    records = list_images(root / "images")
    episode = make_episodes(records, [1], shots=2, count=1, seed=3)[0]
    inputs = load_episode(episode, records, ClassInfo(NAMES, 255), 16)
    with torch.inference_mode():
        reloaded = predict_episode(loaded, inputs, 0.25, torch.device("cpu"))
        original = predict_episode(dataclasses.replace(loaded, model=rebuilt.eval()), inputs, 0.25, torch.device("cpu"))
    assert reloaded.shape == (16, 16) and torch.equal(reloaded, original)


def test_a_stopped_run_resumes_to_the_weights_of_an_uninterrupted_one(workspace, tmp_path, monkeypatch):
    root = workspace[0]
    settings = dataclasses.replace(SETTINGS, steps=4, batch_size=1)
    monkeypatch.setattr(training, "SAVE_EVERY", 2)
    train_fewshot(root / "unet", root / "images", tmp_path / "whole", settings, show_progress=False)
    original_save = training._save_state

    def save_then_stop(*args):
        original_save(*args)
        raise KeyboardInterrupt("stopped after a save")

    with monkeypatch.context() as patch:
        patch.setattr(training, "_save_state", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            train_fewshot(root / "unet", root / "images", tmp_path / "stopped", settings, show_progress=False)
    assert torch.load(tmp_path / "stopped" / ".training" / "state.pt", weights_only=False)["step"] == 2
    summary = train_fewshot(root / "unet", root / "images", tmp_path / "stopped", settings, show_progress=False)
    assert summary.steps == 4
    whole = safetensors.torch.load_file(tmp_path / "whole" / "model.safetensors")
    resumed = safetensors.torch.load_file(tmp_path / "stopped" / "model.safetensors")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[name], resumed[name]) for name in whole)
    with pytest.raises(FileExistsError, match="learning_rate: 0.002 → 0.01"):
        train_fewshot(root / "unet", root / "images", tmp_path / "stopped",
                      dataclasses.replace(settings, learning_rate=1e-2), show_progress=False)


def test_evaluation_scores_the_novel_classes_and_can_score_the_base_ones(workspace, tmp_path):
    root = workspace[0]
    metrics = evaluate_fewshot(root / "model", root / "images", tmp_path / "test", SETTINGS, show_progress=False)
    written = json.loads((tmp_path / "test" / "metrics.json").read_text())
    assert written == metrics and (tmp_path / "test" / "episodes.png").is_file()
    assert list(written["per_class_iou"]) == ["disc"] and written["episodes"] == 4 and written["shots"] == 1
    assert 0 <= written["miou"] <= 1 and written["fold"] == 0 and written["seconds_per_episode"] > 0
    base = evaluate_fewshot(root / "model", root / "images", tmp_path / "train", SETTINGS, show_progress=False,
                            classes="train")
    assert list(base["per_class_iou"]) == ["square"] and base["classes"] == "train"
    assert base["miou"] > 0.5  # it learned its training task (an untrained model: about 0.06)
    with pytest.raises(ValueError, match="trained for fold 0 of 2"):
        evaluate_fewshot(root / "model", root / "images", tmp_path / "other", dataclasses.replace(SETTINGS, fold=1),
                         show_progress=False)


def test_a_latent_diffusion_folder_trains_and_evaluates(workspace, tmp_path):
    root = workspace[0]
    save_tiny_latent_diffusion(tmp_path / "sd", seed=0, with_text_encoder=True)
    settings = dataclasses.replace(SETTINGS, steps=2, episodes=2, batch_size=1, image_size=32)
    summary = train_fewshot(tmp_path / "sd", root / "images", tmp_path / "model", settings, show_progress=False)
    record = json.loads((tmp_path / "model" / "fewshot.json").read_text())
    assert summary.steps == 2 and np.isfinite(summary.final_loss)
    assert record["backbone"]["kind"] == "latent" and record["backbone"]["unet_class"] == "UNet2DConditionModel"
    loaded = load_fewshot_model(tmp_path / "model")
    assert loaded.vae is not None and not any(parameter.requires_grad for parameter in loaded.vae.parameters())
    metrics = evaluate_fewshot(tmp_path / "model", root / "images", tmp_path / "metrics", settings, show_progress=False)
    assert metrics["episodes"] == 2 and list(metrics["per_class_iou"]) == ["disc"] and metrics["image_size"] == 32


def test_a_latent_folder_without_its_vae_is_refused(workspace, tmp_path):
    save_tiny_latent_diffusion(tmp_path / "sd", seed=0)
    shutil.rmtree(tmp_path / "sd" / "vae")
    with pytest.raises(ValueError, match="missing vae/"):
        train_fewshot(tmp_path / "sd", workspace[0] / "images", tmp_path / "model", SETTINGS, show_progress=False)
    assert not (tmp_path / "model").exists()


def test_a_folder_without_classes_and_a_class_no_image_holds_are_refused(workspace, tmp_path):
    checkpoint = workspace[0] / "unet"
    write_image_folder(tmp_path / "unnamed", count=4, size=32)
    with pytest.raises(ValueError, match="no classes.json"):
        train_fewshot(checkpoint, tmp_path / "unnamed", tmp_path / "model", SETTINGS, show_progress=False)
    # A fourth class no image holds: fold 1 of 2 trains on disc (1) and it (3).
    labeled_folder(tmp_path / "absent", count=4, names=[*NAMES, "triangle"])
    with pytest.raises(ValueError, match=r"class 3 \(triangle\) occurs in none of the 4 images"):
        train_fewshot(checkpoint, tmp_path / "absent", tmp_path / "model", dataclasses.replace(SETTINGS, fold=1),
                      show_progress=False)
    assert not (tmp_path / "model").exists()


def test_fine_attention_and_attention_only_training_reload_and_keep_the_convolutions(workspace, tmp_path):
    root = workspace[0]
    settings = dataclasses.replace(SETTINGS, steps=3, fine_attention=[16], trainable="attention")
    train_fewshot(root / "unet", root / "images", tmp_path / "model", settings, show_progress=False)
    weights = safetensors.torch.load_file(tmp_path / "model" / "model.safetensors")
    assert "unet.up_blocks.1.resnets.0.attention.to_q.weight" in weights
    assert torch.equal(weights["unet.down_blocks.0.resnets.0.resnet.conv1.weight"],
                       tiny_attention_unet().down_blocks[0].resnets[0].conv1.weight)  # frozen
    assert not torch.equal(weights["unet.up_blocks.1.resnets.0.attention.to_out.0.weight"],
                           torch.zeros_like(weights["unet.up_blocks.1.resnets.0.attention.to_out.0.weight"]))
    metrics = evaluate_fewshot(tmp_path / "model", root / "images", tmp_path / "eval", settings, show_progress=False)
    assert metrics["episodes"] == 4


def test_random_init_fine_tunes_fresh_weights_of_the_same_network(workspace, tmp_path):
    root = workspace[0]
    settings = dataclasses.replace(SETTINGS, steps=1, learning_rate=1e-12, random_init=True, seed=1)  # tiny_attention_unet is seed 0
    train_fewshot(root / "unet", root / "images", tmp_path / "model", settings, show_progress=False)
    weights = safetensors.torch.load_file(tmp_path / "model" / "model.safetensors")
    pretrained = tiny_attention_unet().state_dict()
    assert {f"unet.{name}" for name in pretrained} <= weights.keys()
    name = "down_blocks.0.resnets.0.conv1.weight"
    assert weights[f"unet.{name}"].shape == pretrained[name].shape
    assert not torch.allclose(weights[f"unet.{name}"], pretrained[name], atol=1e-3)


def test_a_split_by_name_trains_on_the_rest_and_is_evaluated_on_those_names_only(workspace, tmp_path):
    root = workspace[0]
    settings = dataclasses.replace(SETTINGS, steps=2, novel_classes=["disc"])
    train_fewshot(root / "unet", root / "images", tmp_path / "model", settings, show_progress=False)
    record = json.loads((tmp_path / "model" / "fewshot.json").read_text())["fold"]
    assert record["test_classes"] == ["disc"] and record["train_classes"] == ["square"]
    metrics = evaluate_fewshot(tmp_path / "model", root / "images", tmp_path / "eval", settings, show_progress=False)
    assert list(metrics["per_class_iou"]) == ["disc"]
    with pytest.raises(ValueError, match=r"trained with the novel classes \['disc'\], not \['square'\]"):
        evaluate_fewshot(tmp_path / "model", root / "images", tmp_path / "other",
                         dataclasses.replace(settings, novel_classes=["square"]), show_progress=False)


def test_class_weights_must_name_training_classes(workspace, tmp_path):
    root = workspace[0]
    settings = dataclasses.replace(SETTINGS, steps=1, class_weights={"disc": 2.0})  # disc is fold 0's novel class
    with pytest.raises(ValueError, match=r"class_weights name \['disc'\], which are not training classes"):
        train_fewshot(root / "unet", root / "images", tmp_path / "model", settings, show_progress=False)
    assert not (tmp_path / "model").exists()
    weighted = dataclasses.replace(SETTINGS, steps=1, class_weights={"square": 2.0})
    assert train_fewshot(root / "unet", root / "images", tmp_path / "model", weighted, show_progress=False).steps == 1


def test_a_run_saved_before_a_setting_existed_resumes_with_that_setting_at_its_default(workspace, tmp_path):
    root = workspace[0]
    settings = dataclasses.replace(SETTINGS, steps=2, batch_size=1)
    train_fewshot(root / "unet", root / "images", tmp_path / "model", settings, show_progress=False)
    path = tmp_path / "model" / ".training" / "state.pt"
    state = torch.load(path, weights_only=False)
    del state["run"]["settings"]["fold_layout"]  # as saved before fold_layout was added
    torch.save(state, path)
    assert train_fewshot(root / "unet", root / "images", tmp_path / "model", settings, show_progress=False).steps == 2
    with pytest.raises(FileExistsError, match="fold_layout: 'interleaved' → 'blocks'"):
        train_fewshot(root / "unet", root / "images", tmp_path / "model",
                      dataclasses.replace(settings, fold_layout="blocks"), show_progress=False)
