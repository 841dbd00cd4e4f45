"""Forward hooks on the decoder blocks: per-token steering and captures for a packed step.

The hooks are installed once for the life of the model. Around each forward the engine
enters :meth:`SteeringHooks.state` with a :class:`StepHooks`: for each steered layer a table
of deltas ``[entries, hidden]`` (row 0 is zeros) and a per-token index into it, the token
positions whose states to capture at each layer, and the spans to sum (extraction). The
hooks only read that state. Nothing here is thread-safe on purpose: only the engine's worker
runs the model, and forwards from any other thread (a test, ``model.generate``) are left alone.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class StepHooks:
    """What the hooks do during one packed forward (token positions index the packed step)."""

    # layer -> (table [entries, hidden] on the layer's device, index [T] into it)
    steer: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # layer -> token positions whose state (before this layer's steering) to keep, float32
    capture: dict[int, torch.Tensor] = field(default_factory=dict)
    # (key, start, end): sum every layer's states over tokens start:end into sums[key]
    spans: list[tuple[object, int, int]] = field(default_factory=list)
    captured: dict[int, torch.Tensor] = field(default_factory=dict)
    sums: dict[object, dict[int, torch.Tensor]] = field(default_factory=dict)


class ThreadScopedHooks:
    """Forward hooks that act only for the thread inside :meth:`state`, and only while it is
    there: the shared part of :class:`SteeringHooks` and the adapters' hooks. A subclass registers
    its hooks into ``self._handles`` and checks :meth:`active` in each."""

    def __init__(self):
        self.step = None
        self._owner: int | None = None
        self._handles: list = []

    def active(self) -> bool:
        return self.step is not None and self._owner == threading.get_ident()

    @contextmanager
    def state(self, step):
        """Apply ``step`` to the forwards this thread runs inside the block."""
        self.step, self._owner = step, threading.get_ident()
        try:
            yield step
        finally:
            self.step, self._owner = None, None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class SteeringHooks(ThreadScopedHooks):
    """Hooks on every block (and the embeddings, layer 0) that apply a :class:`StepHooks`.

    Example::

        hooks = SteeringHooks(lm.blocks, lm.model.get_input_embeddings())
        step = StepHooks(capture={15: torch.tensor([3])})
        with hooks.state(step):
            model(**packed_inputs)
        step.captured[15]         # [1, hidden]: state of token 3 before layer 15's steering

    Mutates the outputs of the hooked blocks in place where a step steers them.
    """

    def __init__(self, blocks: list[nn.Module], embeddings: nn.Module | None = None):
        super().__init__()
        self._handles = [block.register_forward_hook(self._make_hook(i + 1)) for i, block in enumerate(blocks)]
        if embeddings is not None:
            self._handles.append(embeddings.register_forward_hook(self._make_hook(0)))

    def _make_hook(self, layer: int):
        def hook(_module, _args, output):
            if self.active():
                self.apply(layer, output[0] if isinstance(output, tuple) else output)
            return None

        return hook

    def apply(self, layer: int, hidden: torch.Tensor) -> None:
        """Do what the current step asks at ``layer`` to its output ``hidden`` (in place): what
        the block's forward hook does; the engine's fused forward calls it directly."""
        step = self.step
        if step is None:
            return
        flat = hidden.view(-1, hidden.shape[-1])
        where = step.capture.get(layer)
        if where is not None:
            # Read before this layer's delta, so monitors see the residual before steering here.
            step.captured[layer] = flat.index_select(0, where.to(flat.device)).float()
        for key, start, end in step.spans:
            total = flat[start:end].float().sum(dim=0)
            sums = step.sums.setdefault(key, {})
            sums[layer] = sums[layer] + total.to(sums[layer].device) if layer in sums else total
        steer = step.steer.get(layer)
        if steer is not None and layer > 0:
            table, index = steer
            flat.add_(table.index_select(0, index))
