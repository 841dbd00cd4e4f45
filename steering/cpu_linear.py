"""Linear layers for the engine on CPU: our batch-invariant kernel, or a oneDNN-prepacked weight.

By default (``PERSONA_CPU_KERNELS=1``, where :mod:`steering.cpu_kernels` builds) every product,
whatever its number of rows, runs :func:`steering.cpu_kernels` ``linear`` on the plain weight: a
row's result is the same alone and in any batch, and no second copy of the weight is kept.

Otherwise a weight packed once into oneDNN's blocked layout (what Inductor's freezing pass does
for compiled graphs) serves small steps: oneDNN picks its blocking from the row count, so a row's
numbers then depend on its batch. Measured on this project's 2-core AVX512-BF16 host, a
``[1536, 576]`` projection of one token took 45 µs packed against 83 µs plain, and the
49,152-row output head 4.1 ms against 7.4 ms.

Two measurements shape the packed design. Packing in a thread other than the one that runs the
model (at load time, in the server's main thread) made the engine's plain bfloat16 products
slower for the life of the process: the 32-request burst over HTTP fell from 282 to 205 tok/s,
even when only one weight was packed. So weights are packed on first use, by the thread that
runs the forward: the engine's worker. A :class:`PackedLinear` uses its packed weight up to
``packed_max_rows`` rows and the plain one above; packing up to 64 rows ran the 32-request burst
faster than up to 16 in each of 3 alternating repetitions (248 vs 227, 294 vs 267, 339 vs 296
tok/s), hence 64. In float32 on the 2-core AVX2 host (2026-12-03) oneDNN's packed products beat
the plain ones at every size from 2 rows up to 512 (a ``[3072, 576]`` projection: 229 against
1,174 us for 2 rows, 25.6 against 28.8 ms for 512), so float32 layers use the packed weight for
every step (``MAX_ROWS``).

Packed, both forms of each weight are kept, so the linear weights take twice their memory.
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
    """An ``nn.Linear`` on CPU that multiplies every row count with :mod:`steering.cpu_kernels`
    (``kernel`` set: batch-invariant), or else up to ``packed_max_rows`` rows by a oneDNN-packed
    copy of its bfloat16 or float32 weight (made on first use) and more rows by the weight itself.

    ``forward`` is the base product only; whatever is added per row (a LoRA delta) goes after it.

    Example::

        count = prepack_linears(model)   # every eligible nn.Linear becomes a PackedLinear
    """

    packed: torch.Tensor | None = None  # set on first use, in the thread that runs the model
    packed_max_rows: int = 64
    kernel = None  # steering.cpu_kernels' module, when built and asked for

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.kernel
        if kernel is not None and x.dtype == self.weight.dtype:
            out = kernel.linear(x.reshape(-1, x.shape[-1]).contiguous(), self.weight, self._bias)
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


def prepack_linears(model: nn.Module, max_rows: int | None = None, kernels: bool = True, pack: bool = True) -> int:
    """Turn every bfloat16 or float32 ``nn.Linear`` on CPU in ``model`` into a :class:`PackedLinear`:
    with ``kernels`` (where :mod:`steering.cpu_kernels` builds) it multiplies every step with our
    batch-invariant kernel; otherwise, with ``pack``, it packs its weight for oneDNN on first use
    and uses it up to ``max_rows`` rows (by default ``MAX_ROWS`` of its dtype). Returns how many
    layers changed (0 where neither applies on this CPU or build of torch)."""
    kernel = None
    if kernels:
        from steering import cpu_kernels

        kernel = cpu_kernels.load()
    todo = [m for m in model.modules() if type(m) is nn.Linear and m.weight.device.type == "cpu"
            and m.weight.dtype in MAX_ROWS and m.weight.layout == torch.strided]
    todo = [m for m in todo if (kernel is not None and m.weight.is_contiguous())
            or (pack and packing_available(m.weight.dtype))]
    for module in todo:
        module.__class__ = PackedLinear
        module.packed_max_rows = MAX_ROWS[module.weight.dtype] if max_rows is None else max_rows
        if kernel is not None and module.weight.is_contiguous():
            module.kernel = kernel
        elif not pack:
            module.packed_max_rows = 0
    return len(todo)
