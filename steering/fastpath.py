"""The engine's own forward pass for Llama-style decoders: fewer, larger operations per step.

Run through the HF modules, a decode step of SmolLM2-135M calls about 60 tensor operations and
15 module calls per layer: seven separate projections, RMSNorm as eight operations, RoPE as
seven operations for the queries and seven for the keys. At batch 1 those per-call costs, not
the weights, bound a step on CPU (profiled on the 2-core host: 42 ms a step, of which the
linear layers took 23 ms). :class:`FusedDecoder` runs the same arithmetic over the engine's
packed step with:

- one projection for queries, keys and values and one for gate and up (the weights are
  concatenated once; the HF modules' weights become views into them, so nothing is copied);
- RoPE applied to queries and keys together, as ``x * cos + roll(x) * sin'`` (``sin'`` is
  ``sin`` with its first half negated): bit-identical to HF's ``rotate_half`` form, since a
  product with a negated factor is the negated product;
- RMSNorm as one ``torch.rms_norm`` call in float32, and with HF's operation order otherwise
  (float32 statistics, cast back, then the weight);
- no module calls inside a layer; the engine's steering hooks are applied to each layer's
  output directly (:meth:`SteeringHooks.apply`), exactly where the block's forward hook would.

The numbers match the HF forward up to the order of accumulation inside the fused matrix
products (``tests/test_engine.py`` compares the two). Models whose blocks are not plain
Llama blocks (extra norms, biases on some projections only, other activations) keep the HF
forward: :func:`fused_decoder` returns None for them.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from steering import kvcache
from steering.layers import AttentionShape
from steering.quant import QuantLinear

log = logging.getLogger(__name__)

# Blocks whose forward is exactly: norm, attention (q, k, v, o), residual, norm, gated MLP, residual.
_LLAMA_BLOCKS = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"}
_ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP_PARTS = ("gate_proj", "up_proj", "down_proj")


def _fuse(parts: list[nn.Linear]) -> nn.Linear:
    """One linear layer whose weight is the row-wise concatenation of ``parts``' weights; each
    part's weight (and bias) becomes a view into it, so the memory is not doubled."""
    first = parts[0]
    if isinstance(first, QuantLinear):
        return QuantLinear.concat(parts)
    weight = torch.cat([p.weight.detach() for p in parts], dim=0)
    has_bias = first.bias is not None
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta", dtype=weight.dtype)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    bias = torch.cat([p.bias.detach() for p in parts]) if has_bias else None
    if has_bias:
        fused.bias = nn.Parameter(bias, requires_grad=False)
    start = 0
    for p in parts:
        rows = p.weight.shape[0]
        p.weight = nn.Parameter(weight[start:start + rows], requires_grad=False)
        if has_bias:
            p.bias = nn.Parameter(bias[start:start + rows], requires_grad=False)
        start += rows
    # A part that runs our CPU kernel or packs its weight for small steps (steering.cpu_linear)
    # makes the fused layer do the same; the part's own packed copy, if any, was made from the
    # same numbers.
    if hasattr(first, "packed_max_rows"):
        fused.__class__ = type(first)
        fused.packed_max_rows = first.packed_max_rows
        fused.packed = None
        fused.kernel = getattr(first, "kernel", None)
    return fused


class _Layer:
    __slots__ = ("qkv", "o", "gate_up", "down", "norm1", "norm2", "eps1", "eps2", "attn", "split",
                 "intermediate", "device", "index", "scaling", "window")

    def __init__(self, block: nn.Module):
        attn, mlp = block.self_attn, block.mlp
        self.attn = attn
        self.qkv = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o = attn.o_proj
        self.gate_up = _fuse([mlp.gate_proj, mlp.up_proj])
        self.down = mlp.down_proj
        self.intermediate = mlp.gate_proj.out_features
        self.norm1, self.eps1 = block.input_layernorm.weight, block.input_layernorm.variance_epsilon
        self.norm2, self.eps2 = block.post_attention_layernorm.weight, block.post_attention_layernorm.variance_epsilon
        self.split = (attn.q_proj.out_features, attn.k_proj.out_features + attn.v_proj.out_features)
        self.device = self.qkv.weight.device
        self.index, self.scaling = attn.layer_idx, attn.scaling
        # Qwen2 sets a window per layer on its attention; Mistral's attention reads it from the config.
        self.window = (attn.sliding_window if hasattr(attn, "sliding_window")
                       else getattr(getattr(attn, "config", None), "sliding_window", None))


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, kernels=None) -> torch.Tensor:
    if kernels is not None:  # row by row in a fixed order (steering.cpu_kernels): batch-invariant
        return kernels.rms_norm(x.contiguous(), weight, eps)
    if x.dtype == torch.float32:
        # One call instead of six (about 40 against 65 us for one row on the 2-core host); in
        # float32 it computes what HF's operations do (compared in tests/test_engine.py).
        return torch.rms_norm(x, (x.shape[-1],), weight, eps)
    # HF's LlamaRMSNorm, operation for operation (so the numbers are the same).
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class FusedDecoder:
    """The engine's forward over a packed step for a Llama-style model (see the module doc).

    Example::

        fused = fused_decoder(lm)            # None where the blocks are not Llama-style
        logits = fused(ids, positions, layout, keep, hooks)   # [len(keep), vocab]
    """

    def __init__(self, model: nn.Module, blocks: list[nn.Module], kernels=None):
        inner = model.model
        self.kernels = kernels
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.norm = inner.norm
        self.lm_head = model.lm_head
        shape = AttentionShape.of(model.config)
        self.heads, self.kv_heads, self.head_dim = shape.heads, shape.kv_heads, shape.head_dim
        self.layers = [_Layer(block) for block in blocks]
        # cos and sin per position, computed once for all positions (grown as needed): a token's
        # rotation then never depends on which other positions share its step. Rotations that
        # rescale with the sequence's length ("dynamic") are computed per step instead.
        self._rope_table: tuple[torch.Tensor, torch.Tensor] | None = None
        self._rope_fixed = "dynamic" not in str(getattr(self.rotary, "rope_type", "default"))

    def _rope(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of ``positions`` ``[T]`` for states ``h`` ``[1, T, hidden]``, each ``[T, head_dim]``."""
        if not self._rope_fixed:
            cos, sin = self.rotary(h, positions[None])
            return cos[0], sin[0]
        needed = int(positions.max()) + 1
        if self._rope_table is None or self._rope_table[0].shape[0] < needed:
            size = max(needed, 2 * self._rope_table[0].shape[0] if self._rope_table is not None else 256)
            cos, sin = self.rotary(h[:, :1], torch.arange(size, device=positions.device)[None])
            self._rope_table = (cos[0], sin[0])
        cos, sin = self._rope_table
        return cos.index_select(0, positions), sin.index_select(0, positions)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, layout: kvcache.StepLayout,
                 keep: torch.Tensor, hooks, lora=None) -> torch.Tensor:
        """Logits ``[len(keep), vocab]`` of the packed step ``ids`` ``[T]``; ``hooks`` (a
        :class:`~steering.hooks.SteeringHooks` inside its ``state``) steers and captures; ``lora``
        (a :class:`~steering.adapters.LoraStep`) adds its adapters' deltas to their tokens' products,
        after the base products, which stay those of a step without adapters."""
        total = ids.shape[0]
        kernels = self.kernels
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        half = head_dim // 2
        h = self.embed(ids[None])  # the embedding's forward hook is layer 0's
        cos, sin = self._rope(h, positions)
        cos = cos[:, None, :]  # [T, 1, head_dim]
        sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)[:, None, :]
        h = h[0]
        device = h.device
        # The rotary module may sit on another device of a split (accelerate puts it with the norm).
        cos, sin = cos.to(device), sin.to(device)
        for number, layer in enumerate(self.layers, start=1):
            if layer.device != device:
                device = layer.device
                h, cos, sin = h.to(device), cos.to(device), sin.to(device)
            # The linear parts' forward is called directly: the fused path runs no module hooks.
            x = _rms_norm(h, layer.norm1, layer.eps1, kernels)
            qkv = layer.qkv.forward(x)
            if lora is not None:
                lora.add_fused(number, "qkv", x, qkv)
            q_rows, kv_rows = layer.split
            qk = qkv[:, :q_rows + kv_rows // 2].view(total, heads + kv_heads, head_dim)
            qk = qk * cos + qk.roll(half, dims=-1) * sin
            value = qkv[:, q_rows + kv_rows // 2:].view(total, kv_heads, head_dim)
            out = kvcache.attend(layer.index, qk[:, :heads], qk[:, heads:], value, layer.scaling, layout,
                                 window=layer.window)
            out = out.reshape(total, heads * head_dim)
            attended = layer.o.forward(out)
            if lora is not None:
                lora.add_fused(number, "o", out, attended)
            h = h + attended
            x = _rms_norm(h, layer.norm2, layer.eps2, kernels)
            gate_up = layer.gate_up.forward(x)
            if lora is not None:
                lora.add_fused(number, "gate_up", x, gate_up)
            gate, up = gate_up.split(layer.intermediate, dim=-1)
            x = F.silu(gate) * up if kernels is None else kernels.silu_mul(gate_up)
            mlp = layer.down.forward(x)
            if lora is not None:
                lora.add_fused(number, "down", x, mlp)
            h = h + mlp
            hooks.apply(number, h)
        h = h.index_select(0, keep.to(h.device))
        if kernels is not None:
            return self.lm_head(_rms_norm(h, self.norm.weight, self.norm.variance_epsilon, kernels))
        return self.lm_head(self.norm(h))


def fused_decoder(model: nn.Module, blocks: list[nn.Module], kernels=None) -> FusedDecoder | None:
    """A :class:`FusedDecoder` for ``model`` when every block is a plain Llama-style block with
    SiLU MLP and default-shaped parts; None otherwise (the engine then runs the HF forward).
    ``kernels`` (:mod:`steering.cpu_kernels`, for a model on the CPU) computes its norms and
    activations row by row, batch-invariant."""
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "rotary_emb", "norm")):
        return None
    if not hasattr(model, "lm_head") or not blocks:
        return None
    for block in blocks:
        if type(block).__name__ not in _LLAMA_BLOCKS:
            return None
        attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
        if attn is None or mlp is None or not all(type(getattr(attn, p, None)) in _LINEARS for p in _ATTENTION_PARTS):
            return None
        if not all(type(getattr(mlp, p, None)) in _LINEARS for p in _MLP_PARTS):
            return None
        if getattr(mlp, "act_fn", None).__class__.__name__ not in ("SiLU", "SiLUActivation"):
            return None
        if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            return None
        biases = {getattr(attn, p).bias is None for p in ("q_proj", "k_proj", "v_proj")}
        if len(biases) != 1 or (mlp.gate_proj.bias is None) != (mlp.up_proj.bias is None):
            return None
        devices = {getattr(attn, p).weight.device for p in ("q_proj", "k_proj", "v_proj")}
        devices |= {mlp.gate_proj.weight.device, mlp.up_proj.weight.device}
        if len(devices) != 1 or next(iter(devices)).type == "meta":
            return None
    norm = inner.norm
    if kernels is not None and not (hasattr(norm, "weight") and hasattr(norm, "variance_epsilon")):
        return None
    return FusedDecoder(model, blocks, kernels)


def _linear_types() -> tuple[type, ...]:
    from steering.cpu_linear import PackedLinear

    return (nn.Linear, PackedLinear, QuantLinear)


_LINEARS = _linear_types()


def shared_fused_decoder(model: nn.Module, blocks: list[nn.Module], kernels=None) -> FusedDecoder | None:
    """:func:`fused_decoder`, built once per model (engines over the same model share it; the
    fusing turns the parts' weights into views, which must happen only once)."""
    cached = model.__dict__.get("_persona_fused", False)
    if cached is False:
        cached = fused_decoder(model, blocks, kernels)
        model.__dict__["_persona_fused"] = cached
    return cached
