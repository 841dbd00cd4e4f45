"""Weight-only int8 quantization (``--quantization int8``): linear layers that read a quarter of
float32's bytes, half of bfloat16's.

A batch-1 decode step streams every weight of the model once (about 270 MB for SmolLM2-135M in
bfloat16, more than any cache), so its time is bound by memory traffic, not arithmetic. Each
weight row (output channel) is stored as int8 with one float32 scale, symmetric:
``scale = absmax / 127`` and ``q = round(w / scale)``; the product is computed by
:mod:`steering.cpu_kernels` ``linear_int8``, which widens the int8 weights exactly to float32 and
runs the same fixed FMA chain per output element as the unquantized kernel, then multiplies by the
scale: a row's numbers never depend on its batch, quantized or not. Activations stay in the
model's dtype (weight-only quantization).

What is quantized: every linear layer of the model, the output head included. Where the head is
tied to the input embedding (SmolLM2), only the head's product reads the int8 copy; the embedding
lookup keeps the full weight. The full-width weights of the other layers are freed. The fused
layers of :mod:`steering.fastpath` concatenate quantized parts (:meth:`QuantLinear.concat`),
which is the same as quantizing the concatenation, since every scale belongs to one row.

Only where our kernels run (x86-64 with AVX2, ``PERSONA_CPU_KERNELS`` on): elsewhere
:func:`quantize_model` refuses rather than serving something else.

Example::

    lm = load_model("default", quantization="int8")   # calls quantize_model on the loaded model
"""

from __future__ import annotations

import torch
from torch import nn

METHODS = ("none", "int8")


class QuantizationError(RuntimeError):
    """Quantization cannot run here; the message says why and what to do instead."""


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 of ``weight`` ``[out, in]``: ``(q, scale)`` with ``q``
    int8 ``[out, in]`` and ``scale`` float32 ``[out]``, so that ``q * scale[:, None]`` is the
    weight to within half a step (``scale / 2``) per element. An all-zero row gets scale 0.

    Example::

        q, scale = quantize_int8(torch.randn(4, 8))
    """
    w = weight.detach().to(torch.float32)
    scale = w.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


BLOCK_ROWS, BLOCK_DEPTH = 4, 16


def to_blocks(q: torch.Tensor) -> torch.Tensor:
    """``q`` ``[out, in]`` (out a multiple of 4, in of 16) as the kernel's blocks
    ``[out/4, in/16, 4, 16]``: each group of 4 rows reads as one contiguous stream."""
    out, k = q.shape
    return q.view(out // BLOCK_ROWS, BLOCK_ROWS, k // BLOCK_DEPTH, BLOCK_DEPTH).permute(0, 2, 1, 3).contiguous()


def from_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`to_blocks`."""
    groups, depth = blocks.shape[0], blocks.shape[1]
    return blocks.permute(0, 2, 1, 3).reshape(groups * BLOCK_ROWS, depth * BLOCK_DEPTH)


class QuantLinear(nn.Linear):
    """A linear layer whose weight is int8 with a float32 ``scale`` per output row (and a float32
    bias, if any); ``forward`` takes and returns the model's dtype.

    It stays an ``nn.Linear`` for code that finds projections by type and reads ``in_features``
    and ``out_features`` (LoRA adapters add their deltas after its product). Its ``weight`` is the
    int8 tensor, stored as :func:`to_blocks` blocks where the shape allows (``[out/4, in/16, 4,
    16]``: the kernel then reads each tile's weights as one stream), else ``[out, in]``; nothing may
    treat it as a float weight (:meth:`int8_rows` gives ``[out, in]``).

    Example::

        layer = QuantLinear.of(nn.Linear(576, 1536, bias=False), kernels)
        y = layer(torch.randn(3, 576))
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, kernels):
        nn.Module.__init__(self)
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        if self.out_features % BLOCK_ROWS == 0 and self.in_features % BLOCK_DEPTH == 0:
            q = to_blocks(q)
        self.weight = nn.Parameter(q, requires_grad=False)
        self.register_buffer("scale", scale)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.kernels = kernels

    @classmethod
    def of(cls, linear: nn.Linear, kernels) -> QuantLinear:
        """The int8 form of ``linear`` (its weight is left as it is: the caller drops it)."""
        q, scale = quantize_int8(linear.weight)
        bias = linear.bias.detach().to(torch.float32).contiguous() if linear.bias is not None else None
        return cls(q, scale, bias, kernels)

    @classmethod
    def concat(cls, parts: list[QuantLinear]) -> QuantLinear:
        """One layer whose rows are ``parts``' rows in order; each part's tensors become views into
        it where they line up with its blocks (every part of a Llama model's), so nothing is
        stored twice (the fused projections of :mod:`steering.fastpath`)."""
        fused = cls(torch.cat([p.int8_rows() for p in parts]), torch.cat([p.scale for p in parts]),
                    torch.cat([p.bias.detach() for p in parts]) if parts[0].bias is not None else None,
                    parts[0].kernels)
        blocked = fused.weight.dim() == 4
        if all(p.weight.dim() == fused.weight.dim() for p in parts):
            start = 0
            for p in parts:
                rows = slice(start, start + p.out_features)
                step = BLOCK_ROWS if blocked else 1
                p.weight = nn.Parameter(fused.weight[rows.start // step:rows.stop // step], requires_grad=False)
                p.scale = fused.scale[rows]
                if p.bias is not None:
                    p.bias = nn.Parameter(fused.bias[rows], requires_grad=False)
                start += p.out_features
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.kernels.linear_int8(x.reshape(-1, x.shape[-1]).contiguous(), self.weight, self.scale,
                                       self.bias if self.bias is not None else _NO_BIAS)
        return out.view(*x.shape[:-1], out.shape[-1])

    def int8_rows(self) -> torch.Tensor:
        """The int8 weight as ``[out, in]``."""
        return from_blocks(self.weight.detach()) if self.weight.dim() == 4 else self.weight.detach()

    def dequantized(self) -> torch.Tensor:
        """The weight this layer multiplies by, in float32 (for comparisons and tests)."""
        return self.int8_rows().to(torch.float32) * self.scale[:, None]


_NO_BIAS = torch.empty(0)


def quantize_model(model: nn.Module, method: str, kernels) -> int:
    """Replace every linear layer of ``model`` (on the CPU) by its ``method`` form; returns how many.

    Mutates ``model``: each ``nn.Linear`` becomes a :class:`QuantLinear` and its full-width weight
    is dropped, except a head tied to the input embedding, whose weight lives on as the embedding.
    ``method`` ``"none"`` changes nothing. Raises :class:`QuantizationError` where ``kernels``
    (:mod:`steering.cpu_kernels`' module) is None.

    Example::

        quantize_model(lm.model, "int8", lm.kernels)
    """
    if method == "none":
        return 0
    if method not in METHODS:
        raise QuantizationError(f"unknown quantization {method!r}; use one of {', '.join(METHODS)}")
    if kernels is None:
        raise QuantizationError(
            "--quantization int8 needs our CPU kernels (steering.cpu_kernels: x86-64 with AVX2, a C++ compiler, "
            "the model on the CPU and PERSONA_CPU_KERNELS not 0); serve with --quantization none")
    todo = [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not isinstance(m, QuantLinear) and m.weight.device.type == "cpu"]
    for name, linear in todo:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear.of(linear, kernels))
    return len(todo)
