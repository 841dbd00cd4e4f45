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
attention per token. On CPU with :mod:`steering.cpu_kernels` (the default there) every token,
decoding or prefilled, attends to its own slot's positions up to its own, in one fixed order:
its numbers never depend on the batch, the padding, or how its prompt was chunked. Otherwise
SDPA runs one batched call for all decoding rows (queries folded per KV head, a length mask per
slot) and one call per prefill chunk (causal, offset by what is cached).

Sliding-window attention (Mistral, Qwen2's windowed layers, Gemma 2 and 3) masks keys more than
``window - 1`` positions behind the query, as HF does; logit soft-capping (Gemma 2) caps the
scores as ``softcap * tanh(s / softcap)``, which only the CPU kernel does (the engine refuses
such a model elsewhere).
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
    # Decoding rows' key positions per slot, [span, 1, 1, width] bool; None with kernels (unused there).
    decode_mask: torch.Tensor | None = None
    decode_span: int = 0  # slots 0..span-1 take part in the batched decode attention
    decode_dense: bool = False  # decode_slots == arange(num_decode)
    chunks: list[Chunk] = field(default_factory=list)
    kernels: object = None  # steering.cpu_kernels' module: attention per token, batch-invariant
    # Per device, what every layer's attention would otherwise rebuild (see :meth:`on`).
    _prepared: dict = field(default_factory=dict, repr=False)

    def on(self, device: torch.device, dtype: torch.dtype) -> "_Prepared":
        """This step's indices and masks on ``device``, built once and shared by every layer there:
        the flat cache row of each (token, KV head), the decode rows' additive mask, and each
        chunk's causal additive mask where it continues a cached prefix."""
        ready = self._prepared.get(device)
        if ready is None:
            cache = self.cache
            slots, positions = self.slots.to(device), self.positions.to(device)
            heads = torch.arange(cache.kv_heads, device=device)
            flat = ((slots[:, None] * cache.kv_heads + heads[None, :]) * cache.max_len + positions[:, None]).reshape(-1)
            decode_bias = decode_slots = None
            chunk_bias: list = []
            # The CPU kernels' attention reads slots and positions only (see attend): no masks.
            if self.kernels is None or device.type != "cpu":
                if self.num_decode:
                    decode_bias = _additive(self.decode_mask.to(device), dtype)
                    decode_slots = self.decode_slots.to(device)
                chunk_bias = [None if c.past == 0 else _additive(_causal_mask(c.end - c.start, c.past, device), dtype)
                              for c in self.chunks]
            ready = self._prepared[device] = _Prepared(flat, decode_bias, decode_slots, chunk_bias)
        return ready


@dataclass
class _Prepared:
    flat: torch.Tensor  # [T * kv_heads] row of each (token, KV head) in the cache viewed as [-1, head_dim]
    decode_bias: torch.Tensor | None  # [span, 1, 1, width]: 0 where a decode row reads, -inf elsewhere
    decode_slots: torch.Tensor | None
    chunk_bias: list  # per chunk: [n, past + n] additive causal mask, or None (no cached prefix)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask as the additive one SDPA would build from it (0 and -inf)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


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
        """Make positions ``0..length-1`` of every slot finite (masked reads must not meet NaN).

        Raises ValueError past ``max_len``: the attention writes through a flat view of the cache,
        where such a position would land in the next head's or slot's rows instead of failing."""
        if length > self.max_len:
            raise ValueError(f"position {length - 1} is past the cache's max_len of {self.max_len}")
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
    out = attend(module.layer_idx, query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                 scaling, layout, window=kwargs.get("sliding_window"), softcap=kwargs.get("softcap"))
    return out.unsqueeze(0), None


def attend(layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None,
           layout: StepLayout, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Write the step's keys and values into layer ``layer``'s slots and attend; returns
    ``[T, heads, head_dim]``.

    ``query`` is ``[T, heads, head_dim]`` and ``key``/``value`` ``[T, kv_heads, head_dim]`` in
    packed-step order (decoding rows first, then the prompt chunks), after RoPE. Decoding rows
    take one batched call (the query heads of each KV head folded into one axis, so grouped-query
    attention copies no cache), each chunk one call (causal, after what its slot has cached);
    with ``layout.kernels`` every token takes the CPU kernel instead. ``window``: keys at most
    ``window - 1`` positions behind the query; ``softcap``: Gemma 2's score capping.
    """
    keys, values = layout.cache.keys[layer], layout.cache.values[layer]
    total, heads, head_dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    if layout.kernels is not None and keys.device.type == "cpu":  # the kernel writes the cache itself
        return layout.kernels.attention_stored(query.contiguous(), key.contiguous(), value.contiguous(), keys, values,
                                               layout.slots, layout.positions,
                                               scaling if scaling is not None else head_dim ** -0.5, window or 0,
                                               softcap or 0.0)
    ready = layout.on(keys.device, keys.dtype)
    keys.view(-1, head_dim).index_copy_(0, ready.flat, key.reshape(-1, head_dim))
    values.view(-1, head_dim).index_copy_(0, ready.flat, value.reshape(-1, head_dim))
    if softcap:
        raise NotImplementedError("attention logit soft-capping needs the CPU kernels (steering.cpu_kernels)")
    nd = layout.num_decode
    decoded = None
    if nd:
        span, width = layout.decode_span, ready.decode_bias.shape[-1]
        q = query[:nd].reshape(nd, kv_heads, group, head_dim)
        if not layout.decode_dense:
            full = q.new_zeros((span, kv_heads, group, head_dim))
            full.index_copy_(0, ready.decode_slots, q)
            q = full
        bias = ready.decode_bias
        if window and width > window:
            # Each slot reads its last `window` positions only: those before length - window go.
            lengths = layout.decode_mask[:, 0, 0, :].sum(-1).to(keys.device)
            old = torch.arange(width, device=keys.device)[None, :] < (lengths - window)[:, None]
            bias = bias.masked_fill(old[:, None, None, :], float("-inf"))
        o = F.scaled_dot_product_attention(q, keys[:span, :, :width], values[:span, :, :width],
                                           attn_mask=bias, scale=scaling)
        if not layout.decode_dense:
            o = o.index_select(0, ready.decode_slots)
        decoded = o.reshape(nd, heads, head_dim)
        if nd == total:
            return decoded
    out = query.new_empty((total, heads, head_dim))
    if decoded is not None:
        out[:nd] = decoded
    for chunk, bias in zip(layout.chunks, ready.chunk_bias):
        q = query[chunk.start:chunk.end].transpose(0, 1)[None]
        n = chunk.end - chunk.start
        if window and chunk.past + n > window:
            allowed = _causal_mask(n, chunk.past, keys.device)
            allowed &= (torch.arange(chunk.past + n, device=keys.device)[None, :]
                        > torch.arange(chunk.past, chunk.past + n, device=keys.device)[:, None] - window)
            bias = _additive(allowed, keys.dtype)
        if bias is None:
            k = key[chunk.start:chunk.end].transpose(0, 1)[None]
            v = value[chunk.start:chunk.end].transpose(0, 1)[None]
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)
        else:
            end = chunk.past + chunk.end - chunk.start
            s = chunk.slot
            o = F.scaled_dot_product_attention(q, keys[s:s + 1, :, :end], values[s:s + 1, :, :end],
                                               attn_mask=bias, scale=scaling, enable_gqa=True)
        out[chunk.start:chunk.end] = o[0].transpose(0, 1)
    return out


def register() -> str:
    """Register :func:`slot_attention` with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, slot_attention)
    # Plain forwards (model.generate) get SDPA's masks; the engine passes a 4D placeholder mask,
    # which transformers hands through untouched, so its packed steps build no mask at all.
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    return ATTN_IMPLEMENTATION
