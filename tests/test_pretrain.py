"""DDPM pretraining: outputs, the saved model, resuming (also old-format states), refusals, the EMA ramp and
warm-up, sampling and the CLI command."""

import csv
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cli import main
from conftest import write_image_folder
from pipeline.pretrain.ddpm import pretrain_ddpm
from pipeline.pretrain.sampling import ddim_scheduler, image_grid, sample_images
from pipeline.pretrain.settings import PretrainSettings
from pipeline.pretrain.training import build_unet, warmup_schedule, weight_ema
from pipeline.sources.adm.blocks import decoder_block, decoder_block_names
from pipeline.sources.checkpoints import load_backbone
from pipeline.sources.noise import paper_scheduler

# 5 levels of 32 channels, attention at the lowest: 1.2 M parameters, ~0.1 s per step of 4 images.
TINY = PretrainSettings(
    image_size=32, block_out_channels=[32, 32, 32, 32, 32], attention_levels=[4], steps=3, batch_size=4,
    warmup_steps=2, checkpoint_every=2, sample_count=4, sample_inference_steps=3, device="cpu",
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread: on a shared 2-core machine two OpenMP threads can run 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("pretrain") / "images", count=8, labeled=False)


@pytest.fixture(scope="module")
def tiny_run(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return out, pretrain_ddpm(images, out, TINY, show_progress=False)


def read_state(out):
    return torch.load(out / "state.pt", map_location="cpu", weights_only=True)


def test_a_run_writes_model_losses_and_samples(tiny_run):
    out, summary = tiny_run
    assert (summary.steps_done, summary.resumed_from, summary.images) == (3, 0, 8)
    assert summary.model_dir == out / "model" and summary.parameters > 0 and np.isfinite(summary.final_loss)
    assert {"config.json", "diffusion_pytorch_model.safetensors"} <= {path.name for path in (out / "model").iterdir()}
    with open(out / "loss.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert [int(row["step"]) for row in rows] == [1, 2, 3]
    assert all(float(row["loss"]) > 0 for row in rows)
    samples = Image.open(out / "samples.png")
    assert samples.mode == "RGB" and samples.size[0] >= 2 * 96  # 2×2 cells of 96 px
    record = json.loads((out / "pretrain.json").read_text())
    assert record["settings"]["steps"] == 3 and record["summary"]["steps_done"] == 3
    assert not list(out.glob("*.tmp"))


def test_the_saved_model_is_the_ema_and_loads_as_a_backbone(tiny_run):
    out, _ = tiny_run
    backbone = load_backbone(out / "model")
    assert len(decoder_block_names(backbone.unet)) == 15  # 5 levels × (layers_per_block + 1)
    assert isinstance(decoder_block(backbone.unet, 12), torch.nn.Module)
    assert backbone.architecture["sample_size"] == 32 and backbone.architecture["out_channels"] == 3
    state = read_state(out)
    for name, tensor in backbone.unet.state_dict().items():
        assert torch.equal(tensor, state["ema"][name]), name
    differences = [not torch.equal(state["ema"][name], state["model"][name]) for name in state["model"]]
    assert any(differences), "after training the EMA weights must differ from the raw weights"


def test_resuming_continues_exactly_like_an_uninterrupted_run(images, tmp_path):
    settings = replace(TINY, steps=4, checkpoint_every=2, sample_count=1, sample_inference_steps=1)
    first = pretrain_ddpm(images, tmp_path / "resumed", replace(settings, steps=2), show_progress=False)
    assert first.steps_done == 2 and read_state(tmp_path / "resumed")["step"] == 2
    resumed = pretrain_ddpm(images, tmp_path / "resumed", settings, show_progress=False)
    assert (resumed.resumed_from, resumed.steps_done) == (2, 4)
    straight = pretrain_ddpm(images, tmp_path / "straight", settings, show_progress=False)
    a, b = read_state(tmp_path / "resumed"), read_state(tmp_path / "straight")
    assert a["step"] == b["step"] == 4 and torch.equal(a["losses"], b["losses"]) and len(a["losses"]) == 4
    for part in ("model", "ema"):
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), f"{part}.{name}"
    assert (tmp_path / "resumed" / "loss.csv").read_text() == (tmp_path / "straight" / "loss.csv").read_text()
    assert resumed.final_loss == straight.final_loss


def old_format_state(state: dict, settings: PretrainSettings) -> dict:
    """`state` as the code before diffusers' EMAModel and LR schedule wrote it (format 1): the EMA as
    a plain state dict, no EMA counters, no scheduler state, and the learning rate set by hand."""
    old = {key: value for key, value in state.items() if key not in ("ema_state", "lr_schedule")}
    optimizer = {**state["optimizer"], "param_groups": [
        {key: value for key, value in group.items() if key != "initial_lr"}
        | {"lr": settings.learning_rate * min(1.0, state["step"] / settings.warmup_steps)}
        for group in state["optimizer"]["param_groups"]
    ]}
    return old | {"format": 1, "optimizer": optimizer}


def test_an_old_format_state_resumes_like_a_new_one(images, tmp_path):
    settings = replace(TINY, steps=3, warmup_steps=3, checkpoint_every=5, sample_count=1, sample_inference_steps=1)
    pretrain_ddpm(images, tmp_path / "old", replace(settings, steps=1), show_progress=False)
    torch.save(old_format_state(read_state(tmp_path / "old"), settings), tmp_path / "old" / "state.pt")
    resumed = pretrain_ddpm(images, tmp_path / "old", settings, show_progress=False)
    pretrain_ddpm(images, tmp_path / "new", settings, show_progress=False)
    a, b = read_state(tmp_path / "old"), read_state(tmp_path / "new")
    assert resumed.resumed_from == 1 and a["format"] == b["format"] == 2
    assert torch.equal(a["losses"], b["losses"]) and a["ema_state"] == b["ema_state"]
    schedule_parts = ("last_epoch", "base_lrs", "_last_lr")  # not _step_count: torch's call-order check
    assert [a["lr_schedule"][key] for key in schedule_parts] == [b["lr_schedule"][key] for key in schedule_parts]
    for part in ("model", "ema"):
        for name in b[part]:
            assert torch.equal(a[part][name], b[part][name]), f"{part}.{name}"


def test_a_state_of_an_unknown_format_is_refused_with_a_way_out(images, tiny_run, tmp_path):
    out, _ = tiny_run
    state = read_state(out)
    (tmp_path / "run").mkdir()
    torch.save(state | {"format": 99}, tmp_path / "run" / "state.pt")
    with pytest.raises(ValueError, match=r"state\.pt: unknown training state format 99 .*delete it or use another"):
        pretrain_ddpm(images, tmp_path / "run", TINY, show_progress=False)


def test_the_ema_ramp_is_min_decay_one_plus_n_over_ten_plus_n():
    ema = weight_ema(torch.nn.Linear(1, 1), decay=0.999)
    for n in range(20000):  # update n + 1 of EMAModel is step n of the ramp
        assert ema.get_decay(n + 1) == pytest.approx(min(0.999, (1 + n) / (10 + n)), rel=0, abs=1e-15)


def test_the_warm_up_gives_step_n_the_rate_lr_times_n_plus_one_over_warmup():
    settings = replace(TINY, learning_rate=0.5, warmup_steps=4)
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=settings.learning_rate)
    schedule = warmup_schedule(optimizer, settings, 0)
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates == pytest.approx([0.125, 0.25, 0.375, 0.5, 0.5, 0.5])
    # Rebuilt from a step count (a format-1 state), it continues where it was.
    again = torch.optim.SGD([parameter], lr=settings.learning_rate)
    warmup_schedule(again, settings, 2)
    assert again.param_groups[0]["lr"] == pytest.approx(0.375)


def test_training_noise_is_the_closed_form_per_image():
    clean, noise = torch.rand(3, 3, 4, 4) * 2 - 1, torch.randn(3, 3, 4, 4)
    timesteps = torch.tensor([0, 500, 999])
    alpha_bar = paper_scheduler().alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    expected = alpha_bar.sqrt() * clean + (1 - alpha_bar).sqrt() * noise
    torch.testing.assert_close(paper_scheduler().add_noise(clean, noise, timesteps), expected, rtol=0, atol=1e-6)


def test_a_complete_run_is_not_trained_again(images, tiny_run):
    out, summary = tiny_run
    again = pretrain_ddpm(images, out, replace(TINY, sample_count=1), show_progress=False)
    assert (again.resumed_from, again.steps_done, again.final_loss) == (3, 3, summary.final_loss)


def test_other_settings_images_or_fewer_steps_are_refused(images, tiny_run, tmp_path):
    out, _ = tiny_run
    before = (out / "state.pt").read_bytes()
    with pytest.raises(ValueError, match=r"other settings \(learning_rate: 0.0002 there, 0.001 now\)"):
        pretrain_ddpm(images, out, replace(TINY, learning_rate=1e-3), show_progress=False)
    with pytest.raises(ValueError, match="block_out_channels"):
        pretrain_ddpm(images, out, replace(TINY, block_out_channels=[32, 32, 32, 32, 64]), show_progress=False)
    with pytest.raises(ValueError, match="already at step 3, past steps=2"):
        pretrain_ddpm(images, out, replace(TINY, steps=2), show_progress=False)
    other_images = write_image_folder(tmp_path / "other", count=8, labeled=False, seed=5)
    with pytest.raises(ValueError, match="trained on other images"):
        pretrain_ddpm(other_images, out, TINY, show_progress=False)
    assert (out / "state.pt").read_bytes() == before


def test_settings_are_checked():
    with pytest.raises(ValueError, match="multiples of 32"):
        PretrainSettings(block_out_channels=[48, 64])
    with pytest.raises(ValueError, match="divisible by 2\\^4"):
        PretrainSettings(image_size=40)
    with pytest.raises(ValueError, match="attention_levels"):
        PretrainSettings(attention_levels=[5])
    with pytest.raises(ValueError, match="steps"):
        PretrainSettings(steps=0)
    with pytest.raises(ValueError, match="precision must be one of"):
        PretrainSettings(precision="float16")
    with pytest.raises(ValueError, match="sample_inference_steps 1001 exceeds the 1000 training steps"):
        PretrainSettings(sample_inference_steps=1001)


def test_bfloat16_on_a_cpu_without_it_warns(images, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("pipeline.pretrain.ddpm.has_native_bfloat16", lambda device: False)
    settings = replace(TINY, steps=1, sample_count=1, sample_inference_steps=1, precision="bfloat16")
    pretrain_ddpm(images, tmp_path, settings, show_progress=False)
    assert "no native bfloat16" in caplog.text


def test_a_float32_run_can_resume_in_bfloat16(images, tmp_path):
    settings = replace(TINY, steps=2, checkpoint_every=2, sample_count=1, sample_inference_steps=1)
    pretrain_ddpm(images, tmp_path, settings, show_progress=False)
    before = read_state(tmp_path)
    resumed = pretrain_ddpm(images, tmp_path, replace(settings, steps=4, precision="bfloat16"), show_progress=False)
    after = read_state(tmp_path)
    assert (resumed.resumed_from, resumed.steps_done) == (2, 4)
    # The weights stay float32 (autocast only lowers the forward pass) and did train on.
    assert all(tensor.dtype == torch.float32 for tensor in after["model"].values())
    assert any(not torch.equal(before["model"][name], after["model"][name]) for name in after["model"])
    assert torch.equal(after["losses"][:2], before["losses"]) and len(after["losses"]) == 4


def test_sample_images_is_seeded_uint8():
    unet = build_unet(replace(TINY, image_size=16, block_out_channels=[32, 32], attention_levels=[]))
    first = sample_images(unet, 3, torch.Generator().manual_seed(0), num_inference_steps=2)
    second = sample_images(unet, 3, torch.Generator().manual_seed(0), num_inference_steps=2)
    assert first.shape == (3, 16, 16, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, second)
    assert unet.training  # build_unet returns a training-mode model; sampling restores the mode


def test_ddim_starts_at_999_and_steps_evenly_to_the_clean_image():
    scheduler = ddim_scheduler()
    scheduler.set_timesteps(50)
    assert scheduler.timesteps.tolist() == list(range(999, 0, -20))
    scheduler.set_timesteps(1)
    assert scheduler.timesteps.tolist() == [999] and scheduler.final_alpha_cumprod.item() == 1.0


def test_one_ddim_step_is_the_clipped_prediction_of_the_clean_image():
    unet = build_unet(replace(TINY, image_size=16, block_out_channels=[32, 32], attention_levels=[])).eval()
    sampled = sample_images(unet, 2, torch.Generator().manual_seed(0), num_inference_steps=1)
    noisy = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    alpha_bar = paper_scheduler().alphas_cumprod[999]
    with torch.no_grad():
        predicted = unet(noisy, torch.full((2,), 999)).sample
    clean = ((noisy - (1 - alpha_bar).sqrt() * predicted) / alpha_bar.sqrt()).clamp(-1, 1)
    expected = ((clean + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(sampled.astype(int) - expected.astype(int)).max() <= 1


def test_image_grid_layout():
    images = np.zeros((5, 8, 8, 3), dtype=np.uint8)
    grid = image_grid(images, padding=2, min_cell=16)  # 3 columns, 2 rows of 16-px cells
    assert grid.shape == (2 * 18 + 2, 3 * 18 + 2, 3) and grid.dtype == np.uint8
    assert (grid[2:18, 2:18] == 0).all() and (grid[0] == 255).all()


def test_the_cli_command(images, tmp_path):
    arguments = [
        "--quiet", "pretrain", "--images", images, "--out", tmp_path / "run", "--steps", 2, "--batch-size", 2,
        "--channels", "32,32,32,32,32", "--attention-levels", "", "--sample-count", 1, "--sample-steps", 1,
        "--device", "cpu", "--precision", "bfloat16",
    ]
    result = CliRunner().invoke(main, [str(argument) for argument in arguments], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "pretrain: 2 steps (from 0) on 8 images" in result.output
    assert load_backbone(tmp_path / "run" / "model").architecture["block_out_channels"] == [32] * 5
    assert json.loads((tmp_path / "run" / "pretrain.json").read_text())["settings"]["precision"] == "bfloat16"
    refused = CliRunner().invoke(main, [str(argument) for argument in [*arguments, "--seed", 1]])
    assert refused.exit_code == 1 and "other settings (seed: 0 there, 1 now)" in refused.output
    assert "Traceback" not in refused.output
    assert "pretrain" in CliRunner().invoke(main, ["--help"]).output


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_the_loss_goes_down(images, tmp_path, precision):
    # 4 levels on 16×16 images: a CPU without native bfloat16 emulates it about 10× slower.
    settings = replace(TINY, image_size=16, block_out_channels=[32, 32, 32, 32], attention_levels=[3], steps=40,
                       learning_rate=2e-3, warmup_steps=5, checkpoint_every=40, sample_count=1, precision=precision)
    pretrain_ddpm(images, tmp_path, settings, show_progress=False)
    with open(tmp_path / "loss.csv") as stream:
        losses = [float(row["loss"]) for row in csv.DictReader(stream)]
    assert len(losses) == 40
    # ε-prediction starts near MSE 1 (an untrained UNet) and drops quickly on 8 simple images.
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])
