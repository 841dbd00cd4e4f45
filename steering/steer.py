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


class DeltaTable:
    """Per-layer tables of steering deltas that running rows point into, one entry per (row, phase).

    Entry 0 of every table is zeros (tokens of rows that do not steer that layer). Entries are
    written once when a row joins and freed when it leaves, so a step only builds small index
    tensors, and layers no running row steers cost nothing.

    Example::

        table = DeltaTable(hidden_size=576, dtype=torch.bfloat16, device_of_layer=lm.block_device)
        ids = table.add(row_steering)          # {(layer, phase): entry}
        table.tensor(19)                       # [entries, hidden] on layer 19's device
        table.release(ids)
    """

    def __init__(self, *, hidden_size: int, dtype: torch.dtype, device_of_layer):
        self.hidden_size, self.dtype, self.device_of_layer = hidden_size, dtype, device_of_layer
        self._tables: dict[int, torch.Tensor] = {}
        self._free: dict[int, list[int]] = {}
        self._used: dict[int, int] = {}

    def add(self, steering: "RowSteering | None") -> dict[tuple[int, str], int]:
        ids: dict[tuple[int, str], int] = {}
        if steering is None:
            return ids
        for phase in ("prompt", "response"):
            for layer, delta in getattr(steering, phase).items():
                entry = self._take(layer)
                self._tables[layer][entry] = delta.to(self._tables[layer].device, self.dtype)
                ids[(layer, phase)] = entry
        return ids

    def release(self, ids: dict[tuple[int, str], int]) -> None:
        for (layer, _phase), entry in ids.items():
            self._free[layer].append(entry)
            self._used[layer] -= 1
            if not self._used[layer]:
                del self._tables[layer], self._free[layer], self._used[layer]

    def tensor(self, layer: int) -> torch.Tensor:
        return self._tables[layer]

    def layers(self) -> list[int]:
        return list(self._tables)

    def _take(self, layer: int) -> int:
        if layer not in self._tables:
            self._tables[layer] = torch.zeros(8, self.hidden_size, dtype=self.dtype, device=self.device_of_layer(layer))
            self._free[layer] = list(range(7, 0, -1))
            self._used[layer] = 0
        if not self._free[layer]:
            old = self._tables[layer]
            grown = torch.zeros(2 * len(old), self.hidden_size, dtype=self.dtype, device=old.device)
            grown[: len(old)] = old
            self._tables[layer] = grown
            self._free[layer] = list(range(len(grown) - 1, len(old) - 1, -1))
        self._used[layer] += 1
        return self._free[layer].pop()
