"""The engine's KV cache and the attention that reads it.

The cache is preallocated once: per layer, keys and values of shape
``[slots, kv_heads, max_len, head_dim]``. A running request owns one slot and its tokens
live at positions ``0..length-1`` of that slot, so a row joining or leaving the batch moves
no other row's cache. Memory is bounded by ``slots * max_len`` tokens; pages are touched
(zero-filled) only as far as the longest sequence seen so far.

A step's tokens are packed into one sequence ``[1, T]``: first one token per decoding row,
then the chunks of prompts being prefilled. The HF model runs its own layers on that
sequence (RoPE from per-token position ids); :func:`slot_attention`, registered as an
attention implementation, writes each token's key and value into its slot and computes
attention per row: one batched call for all decoding rows (queries folded per KV head, a
length mask per slot) and one call per prefill chunk (causal, offset by what is cached).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

ATTN_IMPLEMENTATION = "persona_slots"
_ZERO_CHUNK = 256


@dataclass
class Chunk:
    """A prompt chunk in the packed step: tokens ``start:end`` of the step, cached from ``past``."""

    start: int
    end: int
    slot: int
    past: int


@dataclass
class StepLayout:
    """Where every token of one packed step goes; built by the engine, read by the attention."""

    cache: "SlotKVCache"
    slots: torch.Tensor  # [T] slot of each token
    positions: torch.Tensor  # [T] position of each token in its row
    num_decode: int = 0
    decode_slots: torch.Tensor | None = None  # [num_decode]
    decode_mask: torch.Tensor | None = None  # [span, 1, 1, width] bool: key positions each slot reads
    decode_span: int = 0  # slots 0..span-1 take part in the batched decode attention
    decode_dense: bool = False  # decode_slots == arange(num_decode)
    chunks: list[Chunk] = field(default_factory=list)


class SlotKVCache:
    """Per-layer key/value tensors ``[slots, kv_heads, max_len, head_dim]`` on each layer's device.

    Example::

        cache = SlotKVCache(num_layers=30, slots=32, kv_heads=3, head_dim=64, max_len=4096,
                            dtype=torch.bfloat16, device_of_layer=lambda layer: torch.device("cpu"))
        cache.ensure(128)      # positions 0..127 of every slot are now finite
    """

    def __init__(self, *, num_layers: int, slots: int, kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device_of_layer):
        self.slots, self.kv_heads, self.head_dim, self.max_len = slots, kv_heads, head_dim, max_len
        shape = (slots, kv_heads, max_len, head_dim)
        # torch.empty leaves untouched pages uncommitted; ensure() zero-fills what attention reads.
        self.keys = [torch.empty(shape, dtype=dtype, device=device_of_layer(i + 1)) for i in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device_of_layer(i + 1)) for i in range(num_layers)]
        self.ready = 0

    @staticmethod
    def bytes_per_token(*, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def ensure(self, length: int) -> None:
        """Make positions ``0..length-1`` of every slot finite (masked reads must not meet NaN)."""
        if length <= self.ready:
            return
        end = min(self.max_len, -(-length // _ZERO_CHUNK) * _ZERO_CHUNK)
        for tensor in self.keys + self.values:
            tensor[:, :, self.ready:end].zero_()
        self.ready = end

    def clear(self, slot: int, length: int) -> None:
        """Zero a released slot's used positions, so a non-finite value never outlives its request."""
        for tensor in self.keys + self.values:
            tensor[slot, :, :length].zero_()


def _causal_mask(queries: int, past: int, device) -> torch.Tensor:
    keys = torch.arange(past + queries, device=device)
    return keys[None, :] <= (torch.arange(queries, device=device)[:, None] + past)


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention over the slot cache for a packed step (an HF attention implementation).

    ``query`` is ``[1, heads, T, head_dim]``, ``key``/``value`` ``[1, kv_heads, T, head_dim]``,
    both after RoPE. Forwards that carry no ``persona_layout`` (a plain ``model.generate``)
    fall back to SDPA.
    """
    layout: StepLayout | None = kwargs.get("persona_layout")
    if layout is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    layer = module.layer_idx
    keys, values = layout.cache.keys[layer], layout.cache.values[layer]
    heads, total, head_dim = query.shape[1], query.shape[2], query.shape[3]
    kv_heads = key.shape[1]
    group = heads // kv_heads
    keys[layout.slots, :, layout.positions] = key[0].transpose(0, 1)
    values[layout.slots, :, layout.positions] = value[0].transpose(0, 1)
    out = query.new_empty((total, heads, head_dim))
    nd = layout.num_decode
    if nd:
        # One query per row: fold the query heads of each KV head into the query axis, so
        # grouped-query attention needs no copy of the cache.
        span, width = layout.decode_span, layout.decode_mask.shape[-1]
        q = query[0, :, :nd].transpose(0, 1).reshape(nd, kv_heads, group, head_dim)
        if not layout.decode_dense:
            full = q.new_zeros((span, kv_heads, group, head_dim))
            full.index_copy_(0, layout.decode_slots, q)
            q = full
        o = F.scaled_dot_product_attention(q, keys[:span, :, :width], values[:span, :, :width],
                                           attn_mask=layout.decode_mask, scale=scaling)
        if not layout.decode_dense:
            o = o.index_select(0, layout.decode_slots)
        out[:nd] = o.reshape(nd, heads, head_dim)
    for chunk in layout.chunks:
        q = query[:, :, chunk.start:chunk.end]
        if chunk.past == 0:
            o = F.scaled_dot_product_attention(q, key[:, :, chunk.start:chunk.end], value[:, :, chunk.start:chunk.end],
                                               is_causal=True, scale=scaling, enable_gqa=True)
        else:
            end = chunk.past + chunk.end - chunk.start
            s = chunk.slot
            o = F.scaled_dot_product_attention(
                q, keys[s:s + 1, :, :end], values[s:s + 1, :, :end],
                attn_mask=_causal_mask(chunk.end - chunk.start, chunk.past, q.device), scale=scaling, enable_gqa=True)
        out[chunk.start:chunk.end] = o[0].transpose(0, 1)
    return out.unsqueeze(0), None


def register() -> str:
    """Register :func:`slot_attention` with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, slot_attention)
    # Plain forwards (model.generate) get SDPA's masks; the engine passes a 4D placeholder mask,
    # which transformers hands through untouched, so its packed steps build no mask at all.
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    return ATTN_IMPLEMENTATION
