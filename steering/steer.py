"""Steering requests: from wire-level entries to per-layer additive deltas, and their batching.

A request's steering is a list of :class:`SteeringSpec`. :func:`resolve_steering` turns it
into a :class:`RowSteering`, two maps ``layer -> delta [hidden]`` (one added at prompt
positions during prefill, one added at generated positions during decode). The engine
stacks the rows of a batch with :func:`stack_deltas` once per batch change; the hooks then
add ``delta[row]`` to every position of that row, so each row carries its own steering.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from steering.registry import VectorNotFoundError, VectorRegistry

Positions = Literal["all", "prompt", "response"]
Unit = Literal["raw", "unit", "residual"]


class SteeringError(ValueError):
    """A steering entry that cannot be applied; ``param`` names the offending field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class SteeringVectorNotFound(VectorNotFoundError):
    def __init__(self, name: str, param: str):
        super().__init__(name)
        self.param = param


@dataclass(frozen=True)
class SteeringSpec:
    """One steering entry: add ``coefficient`` times ``vector`` at ``layers``.

    ``layers=None`` means the vector's recommended layer. ``unit`` picks what the
    coefficient multiplies: the stored vector (``raw``), its unit direction (``unit``), or
    the unit direction scaled by the layer's mean residual norm (``residual``).
    """

    vector: str
    coefficient: float
    layers: tuple[int, ...] | None = None
    positions: Positions = "all"
    unit: Unit = "raw"


@dataclass
class RowSteering:
    """Per-layer deltas of one request, summed over its entries."""

    prompt: dict[int, torch.Tensor] = field(default_factory=dict)
    response: dict[int, torch.Tensor] = field(default_factory=dict)
    vectors: tuple[str, ...] = ()

    def is_empty(self) -> bool:
        return not self.prompt and not self.response


def resolve_steering(specs: list[SteeringSpec], registry: VectorRegistry) -> RowSteering:
    """Look up every entry's vector and sum the deltas per layer and phase.

    Raises :class:`SteeringError` (bad layer, missing statistics) or
    :class:`SteeringVectorNotFound`, each naming the entry, e.g. ``steering[1].layers``.
    """
    row = RowSteering()
    used: list[str] = []
    for i, spec in enumerate(specs):
        try:
            vector = registry.get(spec.vector)
        except VectorNotFoundError:
            raise SteeringVectorNotFound(spec.vector, f"steering[{i}].vector") from None
        layers = spec.layers
        if layers is None:
            if vector.recommended_layer is None:
                raise SteeringError(
                    f"vector '{vector.name}' has no recommended layer; give 'layers'", f"steering[{i}].layers"
                )
            layers = (vector.recommended_layer,)
        if not layers:
            raise SteeringError("layers must not be empty", f"steering[{i}].layers")
        for layer in layers:
            if not 1 <= layer <= registry.num_layers:
                raise SteeringError(
                    f"layer {layer} is out of range: steerable layers are 1..{registry.num_layers} "
                    "(block outputs; 0 is the embedding layer)",
                    f"steering[{i}].layers",
                )
            delta = _scaled(vector, layer, spec, i)
            for phase, applies in (("prompt", spec.positions != "response"), ("response", spec.positions != "prompt")):
                if applies:
                    target = getattr(row, phase)
                    target[layer] = target[layer] + delta if layer in target else delta
        used.append(vector.name)
    row.vectors = tuple(dict.fromkeys(used))
    return row


def _scaled(vector, layer: int, spec: SteeringSpec, index: int) -> torch.Tensor:
    direction = vector.direction(layer)
    if spec.unit == "raw":
        return spec.coefficient * direction
    norm = direction.norm()
    if norm == 0:
        raise SteeringError(f"vector '{vector.name}' is zero at layer {layer}", f"steering[{index}].layers")
    unit_dir = direction / norm
    if spec.unit == "unit":
        return spec.coefficient * unit_dir
    residual = vector.stats.get("residual_norm")
    if residual is None:
        raise SteeringError(
            f"vector '{vector.name}' has no residual-norm statistics; use unit 'raw' or 'unit'",
            f"steering[{index}].unit",
        )
    return spec.coefficient * float(residual[layer]) * unit_dir


def stack_deltas(
    rows: list[RowSteering | None],
    phase: Literal["prompt", "response"],
    *,
    hidden_size: int,
    dtype: torch.dtype,
    device_of_layer,
) -> dict[int, torch.Tensor]:
    """Build ``layer -> [batch, 1, hidden]`` for the layers any row steers in ``phase``.

    Rows that do not steer a layer get zeros there; layers no row steers are absent, so
    their hooks return at once.
    """
    layers = sorted({layer for row in rows if row is not None for layer in getattr(row, phase)})
    out: dict[int, torch.Tensor] = {}
    for layer in layers:
        block = torch.zeros(len(rows), 1, hidden_size, dtype=torch.float32)
        for r, row in enumerate(rows):
            if row is not None and layer in getattr(row, phase):
                block[r, 0] = getattr(row, phase)[layer]
        out[layer] = block.to(device=device_of_layer(layer), dtype=dtype)
    return out
