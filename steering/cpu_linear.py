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

The same holds for float32 on a CPU without native bfloat16, more so: on the 2-core AVX2 host of
2026-12-03, oneDNN's packed float32 products beat the plain ones at every size we measured from 2
rows up to 512 (a ``[3072, 576]`` projection: 229 against 1,174 us for 2 rows, 2.0 against 3.9 ms
for 32, 25.6 against 28.8 ms for 512; the 49,152-row output head: 30 against 74 ms for 32 rows)
and for one row on the weights too large for the caches (the output head: 7.5 against 13.8 ms),
so float32 layers use the packed weight for every step (``MAX_ROWS``) except single rows, which
take the AVX2 kernel of :mod:`steering.cpu_kernels` where it builds (faster still at one row).

Both forms of each weight are kept, so the linear weights take twice their memory once packed.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


# Rows up to which each dtype uses its packed weight (measured; see the module doc).
MAX_ROWS = {torch.bfloat16: 64, torch.float32: 1 << 30}


_NO_BIAS = torch.empty(0)


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` that multiplies up to ``packed_max_rows`` rows by a oneDNN-packed copy of
    its bfloat16 or float32 weight (made on first use) and more rows by the weight itself.

    Example::

        count = prepack_linears(model)   # every eligible nn.Linear becomes a PackedLinear
    """

    packed: torch.Tensor | None = None  # set on first use, in the thread that runs the model
    packed_max_rows: int = 64
    row_kernel = None  # steering.cpu_kernels' module for one-row float32 products, when built

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.row_kernel
        if kernel is not None and x.numel() == x.shape[-1] and x.dtype == torch.float32 == self.weight.dtype:
            # One row: AVX2 matrix-vector product reading the weight at memory speed (cpu_kernels).
            out = kernel.row_linear(x.reshape(1, -1).contiguous(), self.weight, self._bias)
            return out.view(*x.shape[:-1], out.shape[-1])
        if x.numel() <= self.packed_max_rows * x.shape[-1] and x.dtype == self.weight.dtype:
            if self.packed is None and not self._pack():
                return super().forward(x)
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return super().forward(x)

    @property
    def _bias(self) -> torch.Tensor:
        return self.bias if self.bias is not None else _NO_BIAS

    def _pack(self) -> bool:
        try:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None)
        except RuntimeError as exc:  # an old oneDNN, an odd shape: the plain layer still works
            log.warning("could not prepack a linear weight %s (%s); using the plain layer", tuple(self.weight.shape), exc)
            self.packed_max_rows = 0
            return False
        return True


def packing_available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """True when this build of torch can run oneDNN linear layers in ``dtype`` on this CPU."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return dtype == torch.float32


def prepack_linears(model: nn.Module, max_rows: int | None = None, row_kernel: bool = True) -> int:
    """Turn every bfloat16 or float32 ``nn.Linear`` on CPU in ``model`` into a :class:`PackedLinear`
    that packs its weight on first use and uses it up to ``max_rows`` rows (by default
    ``MAX_ROWS`` of its dtype), float32 ones multiplying a single row with
    :mod:`steering.cpu_kernels` where ``row_kernel`` and it builds; returns how many (0 where this CPU or build of
    torch has no oneDNN for the model's dtype)."""
    todo = [m for m in model.modules() if type(m) is nn.Linear and m.weight.device.type == "cpu"
            and m.weight.dtype in MAX_ROWS and m.weight.layout == torch.strided and packing_available(m.weight.dtype)]
    kernel = None
    if row_kernel and any(m.weight.dtype == torch.float32 for m in todo):
        from steering import cpu_kernels

        kernel = cpu_kernels.load()
    for module in todo:
        module.__class__ = PackedLinear
        module.packed_max_rows = MAX_ROWS[module.weight.dtype] if max_rows is None else max_rows
        if kernel is not None and module.weight.dtype == torch.float32 and module.weight.is_contiguous():
            module.row_kernel = kernel
    return len(todo)
