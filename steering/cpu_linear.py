"""Linear layers that multiply few rows by a oneDNN-prepacked bfloat16 weight, for decoding on CPU.

A plain bfloat16 ``nn.Linear`` on CPU hands its weight to oneDNN in PyTorch's row-major layout
on every call; for the matrix-vector products of small-batch decoding that costs more than the
product. A weight packed once into oneDNN's blocked layout (what Inductor's freezing pass does
for compiled graphs) avoids it: measured on this project's 2-core AVX512-BF16 host, a
``[1536, 576]`` projection of one token took 45 µs packed against 83 µs plain, and the
49,152-row output head 4.1 ms against 7.4 ms.

Two measurements shape the design. Packing in a thread other than the one that runs the model
(at load time, in the server's main thread) made the engine's plain bfloat16 products slower for
the life of the process: the 32-request burst over HTTP fell from 282 to 205 tok/s, even when
only one weight was packed. So weights are packed on first use, by the thread that runs the
forward: the engine's worker. A :class:`PackedLinear` uses its packed weight up to
``packed_max_rows`` rows and the plain one above. The first comparison over HTTP packed at load
time and found 32 rows no faster packed (236 vs 290 tok/s); measured again with packing on first
use, a server packing up to 64 rows ran the 32-request burst faster than one packing up to 16 in
each of 3 alternating repetitions (248 vs 227, 294 vs 267, 339 vs 296 tok/s), hence 64.

Both forms of each weight are kept, so the linear weights take twice their memory once packed.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` that multiplies up to ``packed_max_rows`` rows by a oneDNN-packed copy of
    its bfloat16 weight (made on first use) and more rows by the weight itself.

    Example::

        count = prepack_linears(model)   # every eligible nn.Linear becomes a PackedLinear
    """

    packed: torch.Tensor | None = None  # set on first use, in the thread that runs the model
    packed_max_rows: int = 64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= self.packed_max_rows * x.shape[-1] and x.dtype == torch.bfloat16:
            if self.packed is None and not self._pack():
                return super().forward(x)
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return super().forward(x)

    def _pack(self) -> bool:
        try:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None)
        except RuntimeError as exc:  # an old oneDNN, an odd shape: the plain layer still works
            log.warning("could not prepack a linear weight %s (%s); using the plain layer", tuple(self.weight.shape), exc)
            self.packed_max_rows = 0
            return False
        return True


def packing_available() -> bool:
    """True when this build of torch can run oneDNN bfloat16 linear layers on this CPU."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def prepack_linears(model: nn.Module, max_rows: int = 64) -> int:
    """Turn every bfloat16 ``nn.Linear`` on CPU in ``model`` into a :class:`PackedLinear` that
    packs its weight on first use and uses it up to ``max_rows`` rows; returns how many (0 where
    this CPU or build of torch has no oneDNN bfloat16)."""
    if not packing_available():
        return 0
    todo = [m for m in model.modules() if type(m) is nn.Linear and m.weight.device.type == "cpu"
            and m.weight.dtype == torch.bfloat16 and m.weight.layout == torch.strided]
    for module in todo:
        module.__class__ = PackedLinear
        module.packed_max_rows = max_rows
    return len(todo)
