"""Where each architecture keeps its decoder blocks.

Layer numbers follow ``hidden_states``: 0 is the embedding output, ``L`` is the output of
decoder block ``L`` (1-based), so block ``blocks[L - 1]`` produces layer ``L``.
"""

from __future__ import annotations

from torch import nn

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
