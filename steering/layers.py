"""Where each architecture keeps its decoder blocks.

Layer numbers follow ``hidden_states``: 0 is the embedding output, ``L`` is the output of
decoder block ``L`` (1-based), so block ``blocks[L - 1]`` produces layer ``L``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


def text_config(config):
    """The decoder's own config: a multimodal config nests it, a text model's is the config itself."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


@dataclass(frozen=True)
class AttentionShape:
    """Attention's shape as the config states it, derived in one place for the KV cache, the
    fast path and the attention cost model: query heads, key/value heads (grouped-query attention
    when fewer), and the size of one head.

    Example::

        AttentionShape.of(model.config)   # SmolLM2-135M: AttentionShape(heads=9, kv_heads=3, head_dim=64)
    """

    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config) -> "AttentionShape":
        config = text_config(config)
        heads = config.num_attention_heads
        return cls(heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads)

# Attribute paths from the causal-LM wrapper to its list of decoder blocks.
_BLOCK_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2, Gemma, Phi-3, Phi
    "model.language_model.layers",  # multimodal wrappers around a Llama-style text model
    "transformer.h",  # GPT-2, GPT-J, Falcon
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
)


class UnsupportedArchitectureError(ValueError):
    """The model's decoder blocks are not where any known architecture keeps them."""


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """Return the decoder blocks of ``model`` in order.

    Example::

        blocks = decoder_blocks(model)   # len(blocks) == model.config.num_hidden_layers
    """
    for path in _BLOCK_PATHS:
        node = model
        for attr in path.split("."):
            node = getattr(node, attr, None)
            if node is None:
                break
        if isinstance(node, nn.ModuleList) and len(node) > 0:
            return list(node)
    arch = type(model).__name__
    raise UnsupportedArchitectureError(
        f"cannot find the decoder layers of {arch}; supported layouts: "
        + ", ".join(_BLOCK_PATHS)
    )
