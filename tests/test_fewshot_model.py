"""FewShotUNet and the mask maps on tiny random diffusers models: the support stem, the wiring
of the two passes, gradients, a few training steps, and decoding."""

import pytest
import torch
from diffusers import AutoencoderKL

from conftest import FEWSHOT_SIZE, FEWSHOT_TEXT, tiny_attention_unet, tiny_text_conditioned_unet
from pipeline.fewshot.kv_fusion import FusionMode, KeyValueBank, KeyValueFusionProcessor, key_value_fusion
from pipeline.fewshot.masks import (
    decode_latents,
    decode_masks,
    encode_latents,
    foreground_probabilities,
    masks_to_maps,
    threshold_relative,
)
from pipeline.fewshot.model import FewShotUNet, swapped_input_stem, training_loss

SIZE, TEXT = FEWSHOT_SIZE, FEWSHOT_TEXT
tiny_pixel_unet, tiny_latent_unet = tiny_attention_unet, tiny_text_conditioned_unet


@pytest.fixture(params=["pixel", "latent"])
def model(request) -> FewShotUNet:
    return FewShotUNet(tiny_pixel_unet() if request.param == "pixel" else tiny_latent_unet())


def text_for(model: FewShotUNet) -> torch.Tensor | None:
    return TEXT if model.needs_text else None


def episode(channels: int, queries: int, shots: int, seed: int):
    """Random query images (B, C, H, W), support images and mask maps (B, N, C, H, W)."""
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(queries, channels, SIZE, SIZE, generator=generator)
    support_images = torch.randn(queries, shots, channels, SIZE, SIZE, generator=generator)
    support_masks = masks_to_maps(torch.rand(queries, shots, SIZE, SIZE, generator=generator) > 0.5, channels)
    return query, support_images, support_masks


def test_the_support_stem_reads_image_plus_image_as_conv_in_reads_the_image(model):
    conv_in = model.unet.conv_in
    images = torch.randn(2, conv_in.in_channels, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    assert model.conv_in_ref.weight.shape == (conv_in.out_channels, 2 * conv_in.in_channels, *conv_in.kernel_size)
    assert model.conv_in_ref is not conv_in and model.conv_in_ref.weight.data_ptr() != conv_in.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(model.conv_in_ref(torch.cat([images, images], dim=1)), conv_in(images))
    torch.testing.assert_close(model.conv_in_ref.bias, conv_in.bias)
    assert "conv_in_ref.weight" in model.state_dict() and "unet.conv_in.weight" in model.state_dict()


def test_the_supports_go_through_the_support_stem_and_the_query_through_conv_in(model):
    """With each support's mask map equal to its image, the support stem computes what conv_in
    does, so the model equals a plain record/fuse of the support images."""
    channels = model.unet.config.in_channels
    query, support_images, _ = episode(channels, queries=2, shots=2, seed=1)
    text = text_for(model)
    conditioning = (lambda batch: {"encoder_hidden_states": TEXT.expand(batch, -1, -1)}) if text is not None else (lambda _: {})
    bank = KeyValueBank()
    with torch.no_grad():
        predicted = model(query, support_images, support_images, encoder_hidden_states=text)
        other_masks = model(query, support_images, -support_images, encoder_hidden_states=text)
        with key_value_fusion(model.unet, bank):
            bank.mode = FusionMode.RECORD
            model.unet(support_images.flatten(0, 1), torch.ones(4, dtype=torch.long), **conditioning(4))
            bank.mode = FusionMode.FUSE
            expected = model.unet(query, torch.ones(2, dtype=torch.long), **conditioning(2)).sample
    assert predicted.shape == (2, model.unet.config.out_channels, SIZE, SIZE)
    torch.testing.assert_close(predicted, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(other_masks, predicted, atol=1e-4)  # the masks matter


def test_the_unet_is_left_as_it_was_even_after_an_error(model):
    unet = model.unet
    conv_in, stem = unet.conv_in, model.conv_in_ref
    with pytest.raises(RuntimeError, match="inside"), swapped_input_stem(unet, stem):
        assert unet.conv_in is stem
        raise RuntimeError("inside the block")
    assert unet.conv_in is conv_in
    query, support_images, support_masks = episode(unet.config.in_channels, queries=1, shots=1, seed=2)
    with torch.no_grad():
        model(query, support_images, support_masks, encoder_hidden_states=text_for(model))
    assert unet.conv_in is conv_in
    assert not any(isinstance(getattr(module, "processor", None), KeyValueFusionProcessor) for module in unet.modules())


def test_inputs_that_do_not_fit_are_refused_with_their_shapes():
    model = FewShotUNet(tiny_pixel_unet())
    query, support_images, support_masks = episode(3, queries=2, shots=1, seed=3)
    with pytest.raises(ValueError, match=r"query must be \(B, 3, H, W\)"):
        model(query[:, :2], support_images, support_masks)
    with pytest.raises(ValueError, match="support_images must be"):
        model(query, support_images[:1], support_masks[:1])
    with pytest.raises(ValueError, match="support_masks must be"):
        model(query, support_images, support_masks[:, :, :1])
    with pytest.raises(ValueError, match="takes no encoder_hidden_states"):
        model(query, support_images, support_masks, encoder_hidden_states=TEXT)
    latent = FewShotUNet(tiny_latent_unet())
    query, support_images, support_masks = episode(4, queries=2, shots=1, seed=3)
    with pytest.raises(ValueError, match="needs encoder_hidden_states"):
        latent(query, support_images, support_masks)


def test_the_query_loss_trains_the_support_stem(model):
    query, support_images, support_masks = episode(model.unet.config.in_channels, queries=2, shots=2, seed=4)
    target = masks_to_maps(torch.rand(2, SIZE, SIZE, generator=torch.Generator().manual_seed(5)) > 0.5, query.shape[1])
    prediction = model(query, support_images, support_masks, encoder_hidden_states=text_for(model))
    training_loss(prediction, target).backward()
    assert model.conv_in_ref.weight.grad is not None and model.conv_in_ref.weight.grad.abs().sum() > 0
    assert model.unet.conv_in.weight.grad.abs().sum() > 0


def test_a_few_steps_on_one_episode_reduce_the_loss():
    model = FewShotUNet(tiny_pixel_unet())
    query, support_images, support_masks = episode(3, queries=2, shots=2, seed=6)
    target = masks_to_maps(torch.rand(2, SIZE, SIZE, generator=torch.Generator().manual_seed(7)) > 0.5, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = training_loss(model(query, support_images, support_masks), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_a_token_budget_gives_reproducible_predictions():
    model = FewShotUNet(tiny_pixel_unet(), max_support_tokens=20)
    query, support_images, support_masks = episode(3, queries=1, shots=3, seed=8)
    with torch.no_grad():
        first, second = (model(query, support_images, support_masks, generator=torch.Generator().manual_seed(1))
                         for _ in range(2))
        other = model(query, support_images, support_masks, generator=torch.Generator().manual_seed(2))
    assert torch.equal(first, second) and not torch.equal(first, other)


def test_training_loss_is_the_mean_squared_error():
    prediction, target = torch.zeros(1, 3, 2, 2), torch.ones(1, 3, 2, 2)
    assert training_loss(prediction, 2 * target).item() == pytest.approx(4.0)
    with pytest.raises(ValueError, match="differ in shape"):
        training_loss(prediction, target[:, :1])


def test_masks_become_maps_of_minus_one_and_one_on_every_channel():
    masks = torch.tensor([[[0, 1], [1, 0]]])  # (1, 2, 2)
    maps = masks_to_maps(masks, 3)
    assert maps.shape == (1, 3, 2, 2) and maps.dtype == torch.float32
    assert torch.equal(maps[0, 2], torch.tensor([[-1.0, 1.0], [1.0, -1.0]])) and torch.equal(maps[0, 0], maps[0, 1])
    assert masks_to_maps(torch.zeros(2, 5, 4, 4, dtype=torch.bool), 4).shape == (2, 5, 4, 4, 4)
    assert torch.equal(decode_masks(maps), masks.bool())
    with pytest.raises(ValueError, match="only 0 and 1"):
        masks_to_maps(torch.tensor([[0, 255]]), 3)


def test_decoding_thresholds_relative_to_each_image_maximum():
    # Image 0 is faint (its maximum 0.4) and still has foreground; image 1 is all background.
    probabilities = torch.tensor([[[0.4, 0.11], [0.09, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    masks = threshold_relative(probabilities, 0.25)
    assert torch.equal(masks[0], torch.tensor([[True, True], [False, False]])) and not masks[1].any()
    assert torch.equal(threshold_relative(probabilities, 0.5)[0], torch.tensor([[True, False], [False, False]]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        threshold_relative(probabilities, 1.5)
    # Each channel is clipped to [-1, 1] before the mean: 3 and -1 read as 1 and -1, probability 0.5.
    maps = torch.tensor([3.0, -1.0]).reshape(1, 2, 1, 1)
    assert foreground_probabilities(maps).item() == pytest.approx(0.5)


def test_latents_are_the_vae_mean_or_a_seeded_sample_and_decode_to_pixels():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2).eval()
    maps = masks_to_maps(torch.rand(2, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) > 0.5, 3)
    mean = encode_latents(vae, maps)
    assert mean.shape == (2, 4, SIZE // 2, SIZE // 2) and not mean.requires_grad
    torch.testing.assert_close(encode_latents(vae, maps), mean)
    sample = encode_latents(vae, maps, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(encode_latents(vae, maps, generator=torch.Generator().manual_seed(3)), sample)
    assert not torch.allclose(sample, mean)
    assert decode_latents(vae, mean).shape == (2, 3, SIZE, SIZE)


def test_fine_attention_starts_as_the_identity_and_is_kv_fused():
    from pipeline.fewshot.kv_fusion import self_attention_layers
    from pipeline.fewshot.model import add_fine_attention

    generator = torch.Generator().manual_seed(3)
    query = torch.randn(2, 3, 16, 16, generator=generator)
    supports = torch.randn(2, 1, 3, 16, 16, generator=generator)
    maps = torch.randn(2, 1, 3, 16, 16, generator=generator)
    unet = tiny_attention_unet()
    before = len(self_attention_layers(unet))
    with torch.no_grad():
        expected = FewShotUNet(unet)(query, supports, maps)
        added = add_fine_attention(unet, [16], sample_size=16)
        assert added == ["down_blocks.0.resnets.0.attention", "up_blocks.1.resnets.0.attention",
                         "up_blocks.1.resnets.1.attention"]
        assert len(self_attention_layers(unet)) == before + 3  # KV fusion reaches them
        model = FewShotUNet(unet)
        torch.testing.assert_close(model(query, supports, maps), expected, rtol=0, atol=1e-5)
        for name in added:  # once trained, the new layers change the output
            torch.nn.init.normal_(unet.get_submodule(name).to_out[0].weight, std=0.1, generator=generator)
        assert not torch.allclose(model(query, supports, maps), expected, atol=1e-3)
    with pytest.raises(ValueError, match=r"no block of this UNet works at \[4\]"):
        add_fine_attention(tiny_attention_unet(), [4], sample_size=16)
    with pytest.raises(ValueError, match="pixel-space UNet2DModel"):
        add_fine_attention(tiny_text_conditioned_unet(), [16], sample_size=16)


def test_attention_only_training_freezes_the_convolutions():
    from pipeline.fewshot.model import freeze_except

    model = FewShotUNet(tiny_attention_unet())
    freeze_except(model, "attention")
    trained = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trained and all(".attentions." in name or name.startswith(("conv_in_ref", "unet.conv_out", "unet.conv_norm_out"))
                           for name in trained)
    assert any(".attentions." in name for name in trained) and "conv_in_ref.weight" in trained
    assert not model.unet.conv_in.weight.requires_grad and not model.unet.down_blocks[0].resnets[0].conv1.weight.requires_grad
    freeze_except(model, "all")
    assert all(parameter.requires_grad for parameter in model.parameters())
    with pytest.raises(ValueError, match="trainable must be one of"):
        freeze_except(model, "decoder")


def test_a_support_bank_recorded_once_segments_each_query_as_the_full_forward_does(model):
    channels, text = model.unet.config.in_channels, text_for(model)
    queries, supports, maps = episode(channels, queries=3, shots=2, seed=5)
    supports, maps = supports[:1], maps[:1]  # one support set for every query
    with torch.no_grad():
        bank = model.support_bank(supports, maps, text)
        for query in queries:
            torch.testing.assert_close(model.segment(query[None], bank, text), model(query[None], supports, maps, text),
                                       rtol=0, atol=1e-6)
