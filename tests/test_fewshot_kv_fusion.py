"""KV fusion on tiny random diffusers UNets: the fused attention against attention computed by hand."""

import math

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from conftest import FEWSHOT_SIZE, FEWSHOT_TEXT, tiny_attention_unet, tiny_text_conditioned_unet
from pipeline.fewshot.kv_fusion import (
    FusionMode,
    KeyValueBank,
    KeyValueFusionProcessor,
    key_value_fusion,
    self_attention_layers,
)

SIZE, TEXT = FEWSHOT_SIZE, FEWSHOT_TEXT


def tiny_pixel_unet():
    return tiny_attention_unet().eval()


def tiny_latent_unet():
    return tiny_text_conditioned_unet().eval()


@pytest.fixture(scope="module", params=["pixel", "latent"])
def unet(request):
    return tiny_pixel_unet() if request.param == "pixel" else tiny_latent_unet()


def conditioning(unet, batch: int) -> dict:
    return {"encoder_hidden_states": TEXT.expand(batch, -1, -1)} if isinstance(unet, UNet2DConditionModel) else {}


def run(unet, images: torch.Tensor) -> torch.Tensor:
    """One UNet pass at t = 1 (B, C, H, W) → (B, C, H, W)."""
    return unet(images, torch.ones(len(images), dtype=torch.long), **conditioning(unet, len(images))).sample


def random_images(unet, batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, unet.config.in_channels, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def fused_passes(unet, supports: torch.Tensor, queries: torch.Tensor):
    """The support pass (record) then the query pass (fuse), with every self-attention layer's
    inputs and outputs captured: layer → [support input, query input], layer → query output."""
    layers = self_attention_layers(unet)
    inputs = {name: [] for name in layers}
    outputs = {}

    def capture_input(name):
        return lambda _module, args, kwargs: inputs[name].append(args[0] if args else kwargs["hidden_states"])

    def capture_output(name):
        return lambda _module, _args, output: outputs.__setitem__(name, output)

    handles = [layer.register_forward_pre_hook(capture_input(name), with_kwargs=True) for name, layer in layers.items()]
    bank = KeyValueBank()
    try:
        with torch.no_grad(), key_value_fusion(unet, bank):
            bank.mode = FusionMode.RECORD
            run(unet, supports)
            handles += [layer.register_forward_hook(capture_output(name)) for name, layer in layers.items()]
            bank.mode = "fuse"
            run(unet, queries)
    finally:
        for handle in handles:
            handle.remove()
    return inputs, outputs


def attention_by_hand(attn, query_input: torch.Tensor, support_input: torch.Tensor, shots: int) -> torch.Tensor:
    """softmax(Q [K_q; K_s]ᵀ / √d) [V_q; V_s] per head, with the layer's own projections and
    output projection; query b's supports are support_input[b·N : b·N + N]."""
    def tokens(hidden):  # (B, C, H, W) or (B, L, C) → (B, L, C), group-normed as the layer does
        hidden = hidden.flatten(2).transpose(1, 2) if hidden.ndim == 4 else hidden
        return attn.group_norm(hidden.transpose(1, 2)).transpose(1, 2) if attn.group_norm is not None else hidden

    query_tokens, support_tokens = tokens(query_input), tokens(support_input)
    batch = query_tokens.shape[0]
    heads, results = attn.heads, []
    for index in range(batch):
        own = [query_tokens[index]] + [support_tokens[index * shots + shot] for shot in range(shots)]
        keys, values = attn.to_k(torch.cat(own)), attn.to_v(torch.cat(own))  # (L + N·L, D)
        queries = attn.to_q(query_tokens[index])  # (L, D)
        width = queries.shape[-1] // heads
        per_head = []
        for head in range(heads):
            part = slice(head * width, (head + 1) * width)
            weights = torch.softmax(queries[:, part] @ keys[:, part].T / math.sqrt(width), dim=-1)  # (L, L + N·L)
            per_head.append(weights @ values[:, part])
        results.append(attn.to_out[0](torch.cat(per_head, dim=-1)))
    output = torch.stack(results)  # (B, L, C)
    if query_input.ndim == 4:
        output = output.transpose(1, 2).reshape(query_input.shape)
    if attn.residual_connection:
        output = output + query_input
    return output / attn.rescale_output_factor


@pytest.mark.parametrize("shots", [1, 3])
def test_fused_attention_is_attention_over_query_and_support_tokens(unet, shots):
    queries = random_images(unet, 2, seed=1)
    supports = random_images(unet, 2 * shots, seed=2)
    inputs, outputs = fused_passes(unet, supports, queries)
    layers = self_attention_layers(unet)
    assert len(layers) == 4 and all(not name.endswith("attn2") for name in layers)
    with torch.no_grad():
        for name, attn in layers.items():
            support_input, query_input = inputs[name]
            assert len(support_input) == 2 * shots and len(query_input) == 2
            expected = attention_by_hand(attn, query_input, support_input, shots)
            torch.testing.assert_close(outputs[name], expected, atol=1e-5, rtol=1e-4)


def test_off_mode_is_the_stock_model_and_record_mode_changes_nothing(unet):
    images = random_images(unet, 2, seed=3)
    bank = KeyValueBank()
    with torch.no_grad():
        stock = run(unet, images)
        with key_value_fusion(unet, bank) as fused_layers:
            off = run(unet, images)
            bank.mode = FusionMode.RECORD
            recorded = run(unet, images)
    assert torch.equal(off, stock)
    torch.testing.assert_close(recorded, stock, atol=1e-5, rtol=1e-4)
    assert sorted(bank.entries) == sorted(fused_layers)
    keys, values = bank.entries[fused_layers[0]]
    assert keys.shape[0] == 2 and keys.shape == values.shape


def test_the_stock_processors_come_back_even_when_the_body_raises(unet):
    stock = {name: module.processor for name, module in unet.named_modules() if hasattr(module, "processor")}
    cross = [name for name in stock if name.endswith("attn2")]
    assert len(stock) == 4 + len(cross)
    with pytest.raises(RuntimeError, match="inside"), key_value_fusion(unet, KeyValueBank()) as fused_layers:
        for name, stock_processor in stock.items():
            processor = unet.get_submodule(name).processor
            assert isinstance(processor, KeyValueFusionProcessor) == (name in fused_layers)
            assert name in fused_layers or processor is stock_processor  # cross-attention untouched
        raise RuntimeError("inside the block")
    assert all(unet.get_submodule(name).processor is processor for name, processor in stock.items())


def test_the_loss_of_the_query_reaches_the_support():
    unet = tiny_pixel_unet()
    supports = random_images(unet, 2, seed=4).requires_grad_()
    bank = KeyValueBank()
    with key_value_fusion(unet, bank):
        bank.mode = FusionMode.RECORD
        run(unet, supports)
        bank.mode = FusionMode.FUSE
        run(unet, random_images(unet, 2, seed=5)).square().mean().backward()
    assert supports.grad is not None and supports.grad.abs().sum() > 0


def test_fusing_needs_a_recorded_support_pass_of_whole_shots():
    unet = tiny_pixel_unet()
    bank = KeyValueBank()
    with torch.no_grad(), key_value_fusion(unet, bank):
        bank.mode = FusionMode.FUSE
        with pytest.raises(KeyError, match="record"):
            run(unet, random_images(unet, 2, seed=6))
        bank.mode = FusionMode.RECORD
        run(unet, random_images(unet, 3, seed=7))
        bank.mode = FusionMode.FUSE
        with pytest.raises(ValueError, match="N supports per query"):
            run(unet, random_images(unet, 2, seed=8))
    with pytest.raises(ValueError, match="'fuse', 'record'|one of"):
        bank.mode = "fused"


def test_a_unet_without_attention_is_refused():
    unet = UNet2DModel(sample_size=8, block_out_channels=(32, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, add_attention=False)
    with pytest.raises(ValueError, match="no self-attention"), key_value_fusion(unet, KeyValueBank()):
        pass


def test_a_token_budget_fuses_a_random_subset_of_support_tokens():
    keys = torch.arange(6 * 4 * 8, dtype=torch.float32).reshape(6, 4, 8)  # 2 queries × 3 supports, 4 tokens of width 8
    query_keys = -torch.ones(2, 4, 8)
    fused = []
    for _ in range(2):
        bank = KeyValueBank(max_support_tokens=5, generator=torch.Generator().manual_seed(0))
        bank.record("layer", keys, 2 * keys)
        fused.append(bank.fused("layer", query_keys, 2 * query_keys))
    (fused_keys, fused_values), again = fused
    assert fused_keys.shape == (2, 4 + 5, 8)
    assert torch.equal(fused_keys[:, :4], query_keys) and torch.equal(fused_values, 2 * fused_keys)
    for query in range(2):  # each chosen token is one of that query's own supports' tokens
        own = keys[3 * query : 3 * query + 3].reshape(-1, 8)
        assert all((own == token).all(dim=1).any() for token in fused_keys[query, 4:])
    assert torch.equal(again[0], fused_keys)  # the same generator seed, the same subset
    with pytest.raises(ValueError, match="at least 1"):
        KeyValueBank(max_support_tokens=0)
