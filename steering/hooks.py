"""Forward hooks on the decoder blocks: add per-row steering deltas, capture prefill states.

The hooks are installed once for the life of the model. Around each forward the engine
enters :meth:`SteeringHooks.state` with the deltas (``layer -> [batch, 1, hidden]``), the
layers to capture and the spans to average; the hooks only read those. Nothing here is
thread-safe on purpose: only the engine's worker thread runs the model.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
from torch import nn


class SteeringHooks:
    """Hooks on every block of a model that read the engine's per-batch steering state.

    Example::

        hooks = SteeringHooks(lm.blocks)
        with hooks.state({15: torch.zeros(batch, 1, hidden)}, frozenset({15})) as captured:
            model(**inputs)
        captured[15]              # [batch, hidden]: last-position state before steering

    Mutates the outputs of the hooked blocks in place while a delta is set for them.
    """

    def __init__(self, blocks: list[nn.Module], embeddings: nn.Module | None = None):
        self.deltas: dict[int, torch.Tensor] = {}
        self.capture_layers: frozenset[int] = frozenset()
        self.captured: dict[int, torch.Tensor] = {}
        # (row, start, end) position spans whose mean state is wanted at every layer (extraction).
        self.spans: list[tuple[int, int, int]] = []
        self.span_means: dict[int, torch.Tensor] = {}
        # Only forwards run by the thread inside state() are touched: another engine (or a
        # test) running the same model in another thread never sees this engine's steering.
        self._owner: int | None = None
        self._handles = [block.register_forward_hook(self._make_hook(i + 1)) for i, block in enumerate(blocks)]
        if embeddings is not None:
            self._handles.append(embeddings.register_forward_hook(self._make_hook(0)))

    def _make_hook(self, layer: int):
        def hook(_module, _args, output):
            if self._owner != threading.get_ident():
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            if layer in self.capture_layers:
                # Read before this layer's delta, so monitors see the unsteered residual here.
                self.captured[layer] = hidden[:, -1, :].detach().to(torch.float32, copy=True)
            if self.spans:
                self.span_means[layer] = torch.stack([hidden[r, a:b].float().mean(dim=0) for r, a, b in self.spans])
            if layer == 0:
                return None  # the embedding output is read, never steered
            delta = self.deltas.get(layer)
            if delta is not None:
                hidden.add_(delta)
            return None

        return hook

    @contextmanager
    def state(self, deltas: dict[int, torch.Tensor], capture: frozenset[int] = frozenset(), spans=()):
        """Set deltas, capture layers and spans for the forwards inside the block, then clear them."""
        self.deltas, self.capture_layers, self.captured = deltas, capture, {}
        self.spans, self.span_means = list(spans), {}
        self._owner = threading.get_ident()
        try:
            yield self.captured
        finally:
            self.deltas, self.capture_layers, self.spans, self._owner = {}, frozenset(), [], None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
