"""Tests of checkpoint loading and decoder-block naming (pipeline/sources/checkpoints.py, pipeline/sources/adm).

The golden test reproduces activations that the reference guided-diffusion code produced for a
small ADM checkpoint (../shared/fixtures/adm-tiny). Layout variants that fixture does not cover
(convolution resampling, plain time-embedding shift, class conditioning) are checked against
`adm_reference_forward` below, a direct functional transcription of guided-diffusion's UNetModel
that reads the ADM state dict itself; the golden test validates that reference too.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel

from pipeline.runtime.hashing import file_sha256
from pipeline.sources.adm.blocks import decoder_block, decoder_block_names
from pipeline.sources.checkpoints import Backbone, load_backbone
from pipeline.sources.tiny_unet import make_tiny_unet

FIXTURE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "adm-tiny"
STEPS = (50, 150, 250)
PAPER_BLOCKS = (5, 6, 7, 8, 12)
PAPER_BLOCK_NAMES = {
    5: "up_blocks.1.upsamplers.0",
    6: "up_blocks.2.attentions.0",
    7: "up_blocks.2.attentions.1",
    8: "up_blocks.2.upsamplers.0",
    12: "up_blocks.4.resnets.0",
}
# Flags of the adm-tiny fixture (adm_tiny.json), as guided-diffusion's constructor takes them.
ADM_TINY_FLAGS = {
    "num_levels": 6,
    "num_res_blocks": 2,
    "attention_levels": (False, False, False, True, True, True),
    "resblock_updown": True,
    "use_scale_shift_norm": True,
}
TOLERANCE = 1e-4


# ----------------------------------------------------------------------------------------------
# Fixtures and helpers
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fixture_dir() -> Path:
    if not (FIXTURE_DIR / "adm_tiny.pt").is_file():
        pytest.skip(f"golden fixture {FIXTURE_DIR} is not present")
    return FIXTURE_DIR


@pytest.fixture(scope="module")
def adm_backbone(fixture_dir: Path) -> Backbone:
    return load_backbone(fixture_dir / "adm_tiny.pt")


@pytest.fixture(scope="module")
def expected(fixture_dir: Path) -> dict[str, np.ndarray]:
    with np.load(fixture_dir / "adm_tiny_expected.npz") as arrays:
        return dict(arrays)


@pytest.fixture(scope="module")
def adm_state_dict(fixture_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(fixture_dir / "adm_tiny.pt", map_location="cpu", weights_only=True)


def run_with_hooks(
    unet: UNet2DModel, sample: torch.Tensor, timestep: int, blocks, class_labels=None
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The UNet's output and the outputs of the given decoder blocks, hooks removed afterwards."""
    captured: dict[int, torch.Tensor] = {}
    handles = [
        decoder_block(unet, block).register_forward_hook(
            lambda module, inputs, output, block=block: captured.__setitem__(block, output)
        )
        for block in blocks
    ]
    try:
        with torch.inference_mode():
            output = unet(sample, timestep, class_labels=class_labels).sample
    finally:
        for handle in handles:
            handle.remove()
    return output, captured


def max_abs_diff(actual: torch.Tensor, target) -> float:
    return float((actual.float() - torch.as_tensor(target).float()).abs().max())


# ----------------------------------------------------------------------------------------------
# A functional guided-diffusion UNet, read straight from the ADM state dict
# ----------------------------------------------------------------------------------------------


def _group_norm(state_dict, prefix, tensor):
    return F.group_norm(tensor, 32, state_dict[f"{prefix}.weight"], state_dict[f"{prefix}.bias"], eps=1e-5)


def _conv(state_dict, prefix, tensor, stride=1):
    weight = state_dict[f"{prefix}.weight"]
    return F.conv2d(tensor, weight, state_dict[f"{prefix}.bias"], stride=stride, padding=weight.shape[-1] // 2)


def _timestep_embedding(timestep: int, channels: int) -> torch.Tensor:
    half = channels // 2
    frequencies = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    arguments = float(timestep) * frequencies
    return torch.cat([torch.cos(arguments), torch.sin(arguments)])[None]  # (1, channels)


def _resblock(state_dict, prefix, tensor, embedding, scale_shift, resample=None):
    hidden = F.silu(_group_norm(state_dict, f"{prefix}.in_layers.0", tensor))
    if resample == "down":
        hidden, tensor = F.avg_pool2d(hidden, 2), F.avg_pool2d(tensor, 2)
    elif resample == "up":
        hidden = F.interpolate(hidden, scale_factor=2, mode="nearest")
        tensor = F.interpolate(tensor, scale_factor=2, mode="nearest")
    hidden = _conv(state_dict, f"{prefix}.in_layers.2", hidden)
    projection = F.linear(
        F.silu(embedding), state_dict[f"{prefix}.emb_layers.1.weight"], state_dict[f"{prefix}.emb_layers.1.bias"]
    )[:, :, None, None]
    if scale_shift:
        scale, shift = projection.chunk(2, dim=1)
        hidden = _group_norm(state_dict, f"{prefix}.out_layers.0", hidden) * (1 + scale) + shift
    else:
        hidden = _group_norm(state_dict, f"{prefix}.out_layers.0", hidden + projection)
    hidden = _conv(state_dict, f"{prefix}.out_layers.3", F.silu(hidden))
    if f"{prefix}.skip_connection.weight" in state_dict:
        tensor = _conv(state_dict, f"{prefix}.skip_connection", tensor)
    return tensor + hidden


def _attention(state_dict, prefix, tensor, head_channels=64):
    batch, channels, height, width = tensor.shape
    flat = tensor.reshape(batch, channels, height * width)
    normed = _group_norm(state_dict, f"{prefix}.norm", flat)
    qkv = F.conv1d(normed, state_dict[f"{prefix}.qkv.weight"], state_dict[f"{prefix}.qkv.bias"])  # (B, 3C, L)
    heads = channels // head_channels
    # QKVAttentionLegacy: channels are (head, [q, k, v], head_dim).
    query, key, value = qkv.reshape(batch * heads, 3 * head_channels, -1).split(head_channels, dim=1)
    scale = 1 / math.sqrt(math.sqrt(head_channels))
    weights = torch.softmax(torch.einsum("bct,bcs->bts", query * scale, key * scale), dim=-1)
    attended = torch.einsum("bts,bcs->bct", weights, value).reshape(batch, channels, -1)
    projected = F.conv1d(attended, state_dict[f"{prefix}.proj_out.weight"], state_dict[f"{prefix}.proj_out.bias"])
    return (flat + projected).reshape(batch, channels, height, width)


def adm_reference_forward(
    state_dict, sample, timestep, *, num_levels, num_res_blocks, attention_levels, resblock_updown,
    use_scale_shift_norm, class_label=None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """guided-diffusion UNetModel.forward (legacy attention, 64-channel heads): output and output_blocks."""
    state_dict = {name: tensor.float() for name, tensor in state_dict.items()}
    model_channels = state_dict["time_embed.0.weight"].shape[1]
    embedding = F.linear(_timestep_embedding(timestep, model_channels), state_dict["time_embed.0.weight"],
                         state_dict["time_embed.0.bias"])
    embedding = F.linear(F.silu(embedding), state_dict["time_embed.2.weight"], state_dict["time_embed.2.bias"])
    if class_label is not None:
        embedding = embedding + state_dict["label_emb.weight"][class_label][None]

    def resblock(prefix, tensor, resample=None):
        return _resblock(state_dict, prefix, tensor, embedding, use_scale_shift_norm, resample)

    hidden = _conv(state_dict, "input_blocks.0.0", sample)
    skips, block = [hidden], 1
    for level in range(num_levels):
        for _ in range(num_res_blocks):
            hidden = resblock(f"input_blocks.{block}.0", hidden)
            if attention_levels[level]:
                hidden = _attention(state_dict, f"input_blocks.{block}.1", hidden)
            skips.append(hidden)
            block += 1
        if level < num_levels - 1:
            if resblock_updown:
                hidden = resblock(f"input_blocks.{block}.0", hidden, "down")
            else:
                hidden = _conv(state_dict, f"input_blocks.{block}.0.op", hidden, stride=2)
            skips.append(hidden)
            block += 1
    hidden = resblock("middle_block.0", hidden)
    hidden = _attention(state_dict, "middle_block.1", hidden)
    hidden = resblock("middle_block.2", hidden)
    block_outputs = []
    for level in reversed(range(num_levels)):
        for position in range(num_res_blocks + 1):
            prefix = f"output_blocks.{len(block_outputs)}"
            hidden = resblock(f"{prefix}.0", torch.cat([hidden, skips.pop()], dim=1))
            submodule = 1
            if attention_levels[level]:
                hidden = _attention(state_dict, f"{prefix}.1", hidden)
                submodule = 2
            if level > 0 and position == num_res_blocks:
                if resblock_updown:
                    hidden = resblock(f"{prefix}.{submodule}", hidden, "up")
                else:
                    upsampled = F.interpolate(hidden, scale_factor=2, mode="nearest")
                    hidden = _conv(state_dict, f"{prefix}.{submodule}.conv", upsampled)
            block_outputs.append(hidden)
    output = _conv(state_dict, "out.2", F.silu(_group_norm(state_dict, "out.0", hidden)))
    return output, block_outputs


def with_conv_resampling(state_dict, flags, seed=0):
    """The same ADM with 3x3-convolution resampling (resblock_updown=False) in place of resampling ResBlocks."""
    generator = torch.Generator().manual_seed(seed)
    converted = dict(state_dict)
    blocks_per_level = flags["num_res_blocks"] + 1
    for level in range(flags["num_levels"] - 1):
        down_block = blocks_per_level * (level + 1)
        up_block = blocks_per_level * (level + 1) - 1
        up_submodule = 2 if flags["attention_levels"][flags["num_levels"] - 1 - level] else 1
        for old_prefix, new_prefix in (
            (f"input_blocks.{down_block}.0.", f"input_blocks.{down_block}.0.op."),
            (f"output_blocks.{up_block}.{up_submodule}.", f"output_blocks.{up_block}.{up_submodule}.conv."),
        ):
            channels = converted[f"{old_prefix}out_layers.3.weight"].shape[0]
            for name in [name for name in converted if name.startswith(old_prefix)]:
                del converted[name]
            converted[f"{new_prefix}weight"] = torch.randn(channels, channels, 3, 3, generator=generator) * 0.05
            converted[f"{new_prefix}bias"] = torch.randn(channels, generator=generator) * 0.05
    return converted


def without_scale_shift(state_dict):
    """The same ADM with use_scale_shift_norm=False: time projections keep only their first half."""
    converted = dict(state_dict)
    for name in [name for name in converted if ".emb_layers.1." in name]:
        converted[name] = converted[name][: converted[name].shape[0] // 2].clone()
    return converted


# ----------------------------------------------------------------------------------------------
# Golden fixture
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("timestep", STEPS)
def test_golden_adm_outputs_match_reference_activations(adm_backbone, expected, timestep):
    sample = torch.from_numpy(expected[f"x_t/{timestep}"])[None]
    output, captured = run_with_hooks(adm_backbone.unet, sample, timestep, PAPER_BLOCKS)
    differences = {"model_out": max_abs_diff(output[0], expected[f"model_out/{timestep}"])}
    for block in PAPER_BLOCKS:
        differences[f"block{block}"] = max_abs_diff(captured[block][0], expected[f"block{block}/{timestep}"])
    print(f"t={timestep} max abs diffs: {differences}")
    assert max(differences.values()) <= TOLERANCE, differences


def test_golden_architecture_is_inferred(adm_backbone, fixture_dir):
    architecture = adm_backbone.architecture
    assert adm_backbone.source_format == "guided-diffusion"
    assert architecture["block_out_channels"] == [32, 32, 64, 64, 128, 128]
    assert architecture["down_block_types"] == ["ResnetDownsampleBlock2D"] * 3 + ["AttnDownBlock2D"] * 3
    assert architecture["up_block_types"] == ["AttnUpBlock2D"] * 3 + ["ResnetUpsampleBlock2D"] * 3
    assert architecture["layers_per_block"] == 2
    assert (architecture["in_channels"], architecture["out_channels"]) == (3, 6)
    assert architecture["attention_head_dim"] == 64
    assert architecture["attn_norm_num_groups"] == 32
    assert architecture["resnet_time_scale_shift"] == "scale_shift"
    assert architecture["downsample_type"] == architecture["upsample_type"] == "resnet"
    assert json.loads(json.dumps(architecture)) == architecture
    assert sum(parameter.numel() for parameter in adm_backbone.unet.parameters()) == 8_675_526
    assert adm_backbone.checkpoint_sha256 == hashlib.sha256((fixture_dir / "adm_tiny.pt").read_bytes()).hexdigest()
    assert not adm_backbone.unet.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in adm_backbone.unet.parameters())


def test_reference_transcription_reproduces_golden_activations(adm_state_dict, expected):
    sample = torch.from_numpy(expected["x_t/50"])[None]
    output, block_outputs = adm_reference_forward(adm_state_dict, sample, 50, **ADM_TINY_FLAGS)
    assert max_abs_diff(output[0], expected["model_out/50"]) <= TOLERANCE
    for block in PAPER_BLOCKS:
        assert max_abs_diff(block_outputs[block][0], expected[f"block{block}/50"]) <= TOLERANCE


def test_adm_safetensors_loads_like_the_pickle(adm_backbone, adm_state_dict, expected, tmp_path):
    path = tmp_path / "adm_tiny.safetensors"
    safetensors.torch.save_file(adm_state_dict, str(path))
    backbone = load_backbone(path)
    sample = torch.from_numpy(expected["x_t/150"])[None]
    output, _ = run_with_hooks(backbone.unet, sample, 150, [])
    reference_output, _ = run_with_hooks(adm_backbone.unet, sample, 150, [])
    assert backbone.source_format == "guided-diffusion"
    assert backbone.checkpoint_sha256 == file_sha256(path)
    assert torch.equal(output, reference_output)


# ----------------------------------------------------------------------------------------------
# ADM layout variants against the functional reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["conv_resampling", "no_scale_shift", "class_conditional"])
def test_adm_layout_variants_match_reference(adm_state_dict, expected, tmp_path, variant):
    flags = dict(ADM_TINY_FLAGS)
    state_dict, class_label = dict(adm_state_dict), None
    if variant == "conv_resampling":
        state_dict, flags["resblock_updown"] = with_conv_resampling(state_dict, flags), False
    elif variant == "no_scale_shift":
        state_dict, flags["use_scale_shift_norm"] = without_scale_shift(state_dict), False
    else:
        state_dict["label_emb.weight"] = torch.randn(10, 128, generator=torch.Generator().manual_seed(1))
        class_label = 7
    path = tmp_path / f"{variant}.pt"
    torch.save(state_dict, path)
    backbone = load_backbone(path)
    sample = torch.from_numpy(expected["x_t/150"])[None]
    labels = None if class_label is None else torch.tensor([class_label])
    output, captured = run_with_hooks(backbone.unet, sample, 150, range(18), class_labels=labels)
    reference_output, reference_blocks = adm_reference_forward(
        state_dict, sample, 150, class_label=class_label, **flags
    )
    assert max_abs_diff(output, reference_output) <= TOLERANCE
    for block in range(18):
        assert max_abs_diff(captured[block], reference_blocks[block]) <= TOLERANCE, block
    architecture = backbone.architecture
    if variant == "conv_resampling":
        assert architecture["down_block_types"][:3] == ["DownBlock2D"] * 3
        assert architecture["downsample_type"] == architecture["upsample_type"] == "conv"
    elif variant == "no_scale_shift":
        assert architecture["resnet_time_scale_shift"] == "default"
    else:
        assert architecture["num_class_embeds"] == 10


def test_adm_with_attention_in_only_some_blocks_is_refused(adm_state_dict, tmp_path):
    state_dict = {name: value for name, value in adm_state_dict.items() if not name.startswith("input_blocks.11.1")}
    path = tmp_path / "partial_attention.pt"
    torch.save(state_dict, path)
    with pytest.raises(ValueError, match=r"partial_attention\.pt.*input_blocks\.11\.1.*attention in every block"):
        load_backbone(path)


def test_adm_with_parameter_free_downsampling_is_refused(adm_state_dict, tmp_path):
    state_dict = {name: value for name, value in adm_state_dict.items() if not name.startswith("input_blocks.3.")}
    path = tmp_path / "avgpool.pt"
    torch.save(state_dict, path)
    with pytest.raises(ValueError, match=r"avgpool\.pt.*input_blocks \[3\].*parameter-free"):
        load_backbone(path)


def test_head_width_that_does_not_divide_attention_is_refused(fixture_dir):
    with pytest.raises(ValueError, match="heads of 48 channels"):
        load_backbone(fixture_dir / "adm_tiny.pt", head_channels=48)


# ----------------------------------------------------------------------------------------------
# Decoder block numbering
# ----------------------------------------------------------------------------------------------


def test_paper_block_indices_name_the_documented_modules(adm_backbone):
    names = decoder_block_names(adm_backbone.unet)
    assert len(names) == 18
    assert {block: names[block] for block in PAPER_BLOCKS} == PAPER_BLOCK_NAMES
    unet = adm_backbone.unet
    assert decoder_block(unet, 5) is unet.up_blocks[1].upsamplers[0]
    assert decoder_block(unet, 12) is unet.up_blocks[4].resnets[0]
    assert decoder_block(unet, 17) is unet.up_blocks[5].resnets[2]
    assert decoder_block(unet, 7) is unet.up_blocks[2].attentions[1]
    assert decoder_block(unet, np.int64(6)) is unet.up_blocks[2].attentions[0]


@pytest.mark.parametrize("index", [-1, 18, 100, 1.0, True])
def test_out_of_range_block_index_is_refused(adm_backbone, index):
    with pytest.raises(ValueError, match=rf"index {index!r} is invalid.*18 decoder blocks.*0\.\.17"):
        decoder_block(adm_backbone.unet, index)


def test_tiny_unet_has_paper_numbering_and_tensor_outputs():
    unet = make_tiny_unet(sample_size=32)
    names = decoder_block_names(unet)
    assert len(names) == 15
    assert names[5] == "up_blocks.1.upsamplers.0" and names[12] == "up_blocks.4.resnets.0"
    sample = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    output, captured = run_with_hooks(unet, sample, 50, range(15))
    assert output.shape == (2, 3, 32, 32)
    for block, activation in captured.items():
        assert isinstance(activation, torch.Tensor) and activation.ndim == 4 and activation.shape[0] == 2, block
    assert captured[5].shape[-1] == 8 and captured[12].shape[-1] == 32


def test_tiny_unet_is_deterministic_and_leaves_global_rng_alone():
    state_before = torch.random.get_rng_state()
    first, second, other = make_tiny_unet(seed=0), make_tiny_unet(seed=0), make_tiny_unet(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state_before)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))
    assert not torch.equal(first.conv_in.weight, other.conv_in.weight)


# ----------------------------------------------------------------------------------------------
# diffusers checkpoints
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("safe_serialization", "subfolder"),
    [(True, ""), (False, ""), (True, "unet")],
    ids=["safetensors-folder", "bin-folder", "pipeline-folder"],
)
def test_diffusers_folder_round_trip(tmp_path, safe_serialization, subfolder):
    unet = make_tiny_unet(seed=3)
    model_folder = tmp_path / "model" / subfolder
    unet.save_pretrained(model_folder, safe_serialization=safe_serialization)
    backbone = load_backbone(tmp_path / "model")
    weights_name = "diffusion_pytorch_model." + ("safetensors" if safe_serialization else "bin")
    assert backbone.source_format == "diffusers"
    assert backbone.checkpoint_sha256 == file_sha256(model_folder / weights_name)
    assert backbone.architecture["block_out_channels"] == [32, 32, 64, 64, 64]
    sample = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    output, captured = run_with_hooks(backbone.unet, sample, 250, PAPER_BLOCKS)
    reference_output, reference_blocks = run_with_hooks(unet, sample, 250, PAPER_BLOCKS)
    torch.testing.assert_close(output, reference_output, rtol=0, atol=0)
    for block in PAPER_BLOCKS:
        torch.testing.assert_close(captured[block], reference_blocks[block], rtol=0, atol=0)


@pytest.mark.parametrize("config_place", ["metadata", "config.json"])
def test_diffusers_safetensors_file_with_config(tmp_path, config_place):
    unet = make_tiny_unet(seed=4)
    config = {key: value for key, value in unet.config.items() if not key.startswith("_")}
    path = tmp_path / "tiny.safetensors"
    metadata = {"config": json.dumps(config)} if config_place == "metadata" else None
    if config_place == "config.json":
        (tmp_path / "config.json").write_text(json.dumps(config))
    safetensors.torch.save_file(unet.state_dict(), str(path), metadata=metadata)
    backbone = load_backbone(path)
    assert backbone.source_format == "diffusers"
    assert backbone.checkpoint_sha256 == file_sha256(path)
    sample = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    output, _ = run_with_hooks(backbone.unet, sample, 50, [])
    torch.testing.assert_close(output, run_with_hooks(unet, sample, 50, [])[0], rtol=0, atol=0)


def test_loaded_weights_sit_in_freshly_allocated_aligned_memory(tmp_path):
    # safetensors would hand out views at arbitrary offsets of the file; some CPU kernels
    # round differently on unaligned data, so the same weights would compute other bits.
    unet = make_tiny_unet(seed=5)
    unet.save_pretrained(tmp_path / "model")
    backbone = load_backbone(tmp_path / "model")
    tensors = list(backbone.unet.parameters()) + list(backbone.unet.buffers())
    assert all(tensor.data_ptr() % 64 == 0 for tensor in tensors)


def test_diffusers_safetensors_without_config_is_refused(tmp_path):
    path = tmp_path / "no_config.safetensors"
    safetensors.torch.save_file(make_tiny_unet().state_dict(), str(path))
    with pytest.raises(ValueError, match=r"no_config\.safetensors.*config"):
        load_backbone(path)


# ----------------------------------------------------------------------------------------------
# Bad files
# ----------------------------------------------------------------------------------------------


class _CreatesFileWhenUnpickled:
    """Unpickling this calls open(path, "w"): arbitrary code that leaves a visible trace."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(1), "payload": _CreatesFileWhenUnpickled(marker)}, path)
    with pytest.raises(ValueError, match=r"evil\.pt.*weights_only"):
        load_backbone(path)
    assert not marker.exists()
    # Inside a diffusers folder too (diffusers reads .bin weights with weights_only=True).
    folder = tmp_path / "evil_folder"
    make_tiny_unet().save_config(folder)
    shutil.copyfile(path, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="evil_folder"):
        load_backbone(folder)
    assert not marker.exists()
    # The payload is live: an unsafe load does run it.
    loaded = torch.load(path, weights_only=False)
    loaded["payload"].close()
    assert marker.exists()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_file_is_refused(fixture_dir, adm_state_dict, tmp_path, suffix):
    whole = tmp_path / f"whole{suffix}"
    if suffix == ".pt":
        shutil.copyfile(fixture_dir / "adm_tiny.pt", whole)
    else:
        safetensors.torch.save_file(adm_state_dict, str(whole))
    truncated = tmp_path / f"truncated{suffix}"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"truncated{suffix}.*expected a state dict"):
        load_backbone(truncated)


def test_file_that_is_not_a_state_dict_is_refused(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match=r"garbage\.pt.*expected a state dict"):
        load_backbone(garbage)
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(ValueError, match=r"list\.pt.*expected a state dict"):
        load_backbone(path)
    unrelated = tmp_path / "unrelated.pt"
    torch.save({"encoder.weight": torch.zeros(2)}, unrelated)
    with pytest.raises(ValueError, match=r"unrelated\.pt.*not a diffusion UNet"):
        load_backbone(unrelated)


def test_missing_path_is_refused(tmp_path):
    missing = tmp_path / "nowhere" / "model.pt"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_backbone(missing)
