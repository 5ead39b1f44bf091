"""KV fusion (DiffewS): the query's self-attention also attends to the support images' tokens.

Two forward passes of the same UNet share one `KeyValueBank`:

1. the support pass (`FusionMode.RECORD`) is the ordinary UNet; every self-attention layer
   keeps its keys and values, (Q·N, L, D) for Q queries with N supports each, in the bank.
   They are not detached: a loss on the query pass trains the support path too.
2. the query pass (`FusionMode.FUSE`) runs every self-attention layer with keys [K_q ; K_s] and
   values [V_q ; V_s] concatenated along the token axis, (Q, L + N·L, D): the N supports of a
   query form one bank of N·L tokens. The projections are the layer's own (shared).

Cross-attention (`attn2`, text conditioning) is untouched. `FusionMode.OFF` calls the layer's
stock processor, so an installed but idle fusion changes nothing.

`key_value_fusion` installs the processors for the length of a `with` block and puts the stock
ones back on exit, even on error; the bank lives outside the model, so nothing else is stashed
on its modules.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

logger = logging.getLogger(__name__)

# A function of a layer's keys and values (B, L, D) that returns the ones it should attend to.
KeyValueExchange = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class FusionMode(enum.StrEnum):
    """What the installed processors do: nothing, record the support's keys and values, or fuse them."""

    OFF = "off"
    RECORD = "record"
    FUSE = "fuse"


class KeyValueBank:
    """The support keys and values of each self-attention layer, between the two passes.

    Args:
        max_support_tokens: when set and a query's bank holds more tokens (N·L), a random
            subset of this many is fused (the paper's "sample" variant for many shots, which
            scored better than all tokens). None fuses every token.
        generator: a CPU generator for that subset (reproducible sampling); None uses torch's
            global one.

    Attributes:
        mode: a `FusionMode` (strings "off", "record", "fuse" are accepted).
        entries: layer name → (keys, values), each (Q·N, L, D), with their autograd history.
    """

    def __init__(self, max_support_tokens: int | None = None, generator: torch.Generator | None = None):
        if max_support_tokens is not None and max_support_tokens < 1:
            raise ValueError(f"max_support_tokens must be at least 1 (or None for all tokens), got {max_support_tokens}")
        self.max_support_tokens = max_support_tokens
        self.generator = generator
        self.entries: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._mode = FusionMode.OFF

    @property
    def mode(self) -> FusionMode:
        return self._mode

    @mode.setter
    def mode(self, mode: FusionMode | str) -> None:
        try:
            self._mode = FusionMode(mode)
        except ValueError:
            raise ValueError(f"mode {mode!r} is not one of {[member.value for member in FusionMode]}") from None

    def clear(self) -> None:
        """Forgets every recorded layer (frees the support activations)."""
        self.entries.clear()

    def record(self, layer: str, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keeps a support pass's keys and values (Q·N, L, D) of `layer`, not detached."""
        self.entries[layer] = (keys, values)

    def fused(self, layer: str, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The query's keys and values (Q, L, D) followed by its supports' (Q, L + N·L', D) or,
        with `max_support_tokens` = M < N·L', (Q, L + M, D).

        Raises:
            KeyError: `layer` was not recorded (no support pass ran with this bank).
            ValueError: the support batch is not a whole number of supports per query, or the
                width of the recorded keys differs from the query's.
        """
        if layer not in self.entries:
            raise KeyError(f"no support keys recorded for {layer!r}: run the support pass in mode 'record' first")
        support_keys, support_values = self.entries[layer]
        queries, width = keys.shape[0], keys.shape[-1]
        if support_keys.shape[0] % queries or support_keys.shape[-1] != width:
            raise ValueError(
                f"{layer}: support keys of shape {tuple(support_keys.shape)} do not fit {queries} queries of width {width} "
                "(the support batch must hold N supports per query, query-major)"
            )
        # (Q·N, L', D) → (Q, N·L', D): supports b·N .. b·N + N - 1 belong to query b.
        support_keys = support_keys.reshape(queries, -1, width)
        support_values = support_values.reshape(queries, -1, width)
        if self.max_support_tokens is not None and support_keys.shape[1] > self.max_support_tokens:
            chosen = torch.randperm(support_keys.shape[1], generator=self.generator)[: self.max_support_tokens]
            chosen = chosen.to(support_keys.device)
            support_keys, support_values = support_keys[:, chosen], support_values[:, chosen]
        return torch.cat([keys, support_keys.to(keys.dtype)], dim=1), torch.cat([values, support_values.to(values.dtype)], dim=1)


class KeyValueFusionProcessor:
    """A diffusers attention processor for one self-attention layer, driven by a `KeyValueBank`.

    Args:
        layer: the layer's module path (its key in the bank).
        bank: shared by every layer of the UNet.
        stock_processor: the processor it replaces, called as is in mode "off".
    """

    def __init__(self, layer: str, bank: KeyValueBank, stock_processor: Callable):
        self.layer = layer
        self.bank = bank
        self.stock_processor = stock_processor

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        mode = self.bank.mode
        if mode is FusionMode.OFF:
            extra = {} if temb is None else {"temb": temb}
            return self.stock_processor(
                attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **extra
            )
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(
                f"{self.layer}: KV fusion needs plain self-attention, but the layer was called with "
                f"{'encoder_hidden_states' if encoder_hidden_states is not None else 'an attention_mask'}"
            )
        if mode is FusionMode.RECORD:
            return self_attention(attn, hidden_states, temb, self._record)
        return self_attention(attn, hidden_states, temb, lambda keys, values: self.bank.fused(self.layer, keys, values))

    def _record(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.bank.record(self.layer, keys, values)
        return keys, values


def self_attention(
    attn: Attention, hidden_states: torch.Tensor, temb: torch.Tensor | None, exchange: KeyValueExchange
) -> torch.Tensor:
    """A diffusers `Attention` layer's self-attention, with its keys and values passed through `exchange`.

    Follows diffusers' `AttnProcessor2_0` step by step (spatial and group norm, projections,
    heads, output projection, residual, rescaling), so with `exchange` the identity it is the
    stock layer.

    Args:
        attn: the layer (its projections, norms and head count are used).
        hidden_states: (B, L, C) tokens or a (B, C, H, W) feature map.
        temb: the time embedding, used only by a spatial norm.
        exchange: (keys, values) (B, L, D) → the keys and values to attend to, (B, L_kv, D).

    Returns:
        The layer's output, shaped like `hidden_states`.
    """
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    spatial_shape = hidden_states.shape if hidden_states.ndim == 4 else None
    if spatial_shape is not None:
        hidden_states = hidden_states.flatten(2).transpose(1, 2)  # (B, C, H, W) → (B, HW, C)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)  # (B, L, D)
    keys, values = exchange(attn.to_k(hidden_states), attn.to_v(hidden_states))  # (B, L_kv, D)
    output = _multi_head_attention(attn, query, keys, values)  # (B, L, D)
    output = attn.to_out[1](attn.to_out[0](output))  # projection, then dropout
    if spatial_shape is not None:
        output = output.transpose(1, 2).reshape(spatial_shape)
    if attn.residual_connection:
        output = output + residual
    return output / attn.rescale_output_factor


def _multi_head_attention(attn: Attention, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention over `attn.heads` heads: (B, L, D) queries, (B, L_kv, D)
    keys and values → (B, L, D)."""
    batch, head_width = query.shape[0], query.shape[-1] // attn.heads

    def split_heads(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.reshape(batch, -1, attn.heads, head_width).transpose(1, 2)  # (B, heads, L, d)

    query, keys, values = split_heads(query), split_heads(keys), split_heads(values)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        keys = attn.norm_k(keys)
    output = F.scaled_dot_product_attention(query, keys, values, dropout_p=0.0, scale=attn.scale)
    return output.transpose(1, 2).reshape(batch, -1, attn.heads * head_width).to(query.dtype)


def self_attention_layers(unet: torch.nn.Module) -> dict[str, Attention]:
    """Every self-attention layer of a UNet, by module path: `attn1` of each transformer block of
    a `UNet2DConditionModel`, the attention of each Attn*Block2D of a `UNet2DModel`.

    Raises:
        ValueError: the UNet has no self-attention, or a layer with added key/value projections
            (a conditioning KV fusion does not handle).
    """
    layers = {
        name: module for name, module in unet.named_modules() if isinstance(module, Attention) and not module.is_cross_attention
    }
    if not layers:
        raise ValueError(f"{type(unet).__name__} has no self-attention layer: KV fusion needs attention blocks")
    added = [name for name, module in layers.items() if getattr(module, "added_kv_proj_dim", None) is not None]
    if added:
        raise ValueError(f"self-attention layers with added key/value projections are not supported: {added}")
    return layers


@contextlib.contextmanager
def key_value_fusion(unet: torch.nn.Module, bank: KeyValueBank) -> Iterator[list[str]]:
    """Installs a `KeyValueFusionProcessor` on every self-attention layer of `unet` for the
    length of the block; the stock processors are put back on exit, even on error.

    Args:
        unet: a diffusers `UNet2DModel` or `UNet2DConditionModel`.
        bank: switched between modes by the caller around its forward passes.

    Yields:
        The module paths of the fused layers, in model order.
    """
    layers = self_attention_layers(unet)
    stock = {name: layer.get_processor() for name, layer in layers.items()}
    try:
        for name, layer in layers.items():
            layer.set_processor(KeyValueFusionProcessor(name, bank, stock[name]))
        logger.debug("KV fusion installed on %d self-attention layers", len(layers))
        yield list(layers)
    finally:
        for name, layer in layers.items():
            layer.set_processor(stock[name])
