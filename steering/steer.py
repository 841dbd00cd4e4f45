"""Steering requests: from wire-level entries to per-layer additive deltas, and their batching.

A request's steering is a list of :class:`SteeringSpec`. :func:`resolve_terms` resolves each
entry's vector, layers, phases and raw-unit coefficient (:class:`SteeringTerm`), the one
resolution both the deltas and the server's steering policy read; :func:`build_row` sums the
terms into a :class:`RowSteering`, two maps ``layer -> delta [hidden]`` (one added at prompt
positions during prefill, one added at generated positions during decode). The engine
stacks the rows of a batch with :func:`stack_deltas` once per batch change; the hooks then
add ``delta[row]`` to every position of that row, so each row carries its own steering.

A :class:`ConditionalSteering` (a monitor's remediation) is response-phase steering that the
engine switches on for a row at the end of its prefill, when the row's own reading passes a limit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from steering.registry import VectorNotFoundError, VectorRegistry
from steering.vector import PersonaVector

Positions = Literal["all", "prompt", "response"]
Phase = Literal["prompt", "response"]
Unit = Literal["raw", "unit", "residual"]
PHASES: dict[str, tuple[Phase, ...]] = {"all": ("prompt", "response"), "prompt": ("prompt",), "response": ("response",)}


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


def add_deltas(a: dict[int, torch.Tensor], b: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Per-layer sum of two delta maps (a new map; neither argument changes)."""
    out = dict(a)
    for layer, delta in b.items():
        out[layer] = out[layer] + delta if layer in out else delta
    return out


@dataclass(frozen=True)
class ConditionalSteering:
    """Response-phase deltas ``response`` (``layer -> [hidden]``) that the engine adds to a row's
    generated tokens when the last prompt token's projection on probe ``index`` at ``layer`` (of
    the request's probes) is above ``limit``, decided at the end of the row's prefill.

    The first generated token is sampled from the prefill's last logits, which it cannot change,
    so it is never steered by it; every later token is, exactly as if the request had carried
    ``response`` as its own ``positions: "response"`` steering (that also starts at the first
    generated token's position, which produces the second token).
    """

    name: str
    layer: int
    index: int
    limit: float
    response: dict[int, torch.Tensor]


@dataclass(frozen=True)
class SteeringTerm:
    """One entry at one layer, resolved: the delta it adds is ``raw * vector.direction(layer)``
    at the positions of ``phases``. The engine's deltas and the server's steering policy are
    both built from these, so the coefficient the policy bounds is the one that is applied."""

    entry: int
    vector: PersonaVector
    layer: int
    phases: tuple[Phase, ...]
    raw: float


def resolve_terms(specs: list[SteeringSpec], registry: VectorRegistry) -> list[SteeringTerm]:
    """Look up every entry's vector and layers and convert its coefficient to raw units.

    Raises :class:`SteeringError` (bad layer, missing statistics) or
    :class:`SteeringVectorNotFound`, each naming the entry, e.g. ``steering[1].layers``.

    Example::

        resolve_terms([SteeringSpec("optimistic", 1.0, unit="unit")], registry)
        # [SteeringTerm(entry=0, vector=..., layer=19, phases=("prompt", "response"), raw=0.21)]
    """
    terms = []
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
        phases = PHASES[spec.positions]
        for layer in layers:
            if not 1 <= layer <= registry.num_layers:
                raise SteeringError(
                    f"layer {layer} is out of range: steerable layers are 1..{registry.num_layers} "
                    "(block outputs; 0 is the embedding layer)",
                    f"steering[{i}].layers",
                )
            terms.append(SteeringTerm(i, vector, layer, phases, _raw(vector, layer, spec, i)))
    return terms


def build_row(terms: list[SteeringTerm]) -> RowSteering:
    """Sum the terms' deltas per layer and phase."""
    row = RowSteering()
    for term in terms:
        delta = term.raw * term.vector.direction(term.layer)
        for phase in term.phases:
            target = getattr(row, phase)
            target[term.layer] = target[term.layer] + delta if term.layer in target else delta
    row.vectors = tuple(dict.fromkeys(term.vector.name for term in terms))
    return row


def resolve_steering(specs: list[SteeringSpec], registry: VectorRegistry) -> RowSteering:
    """Resolve a request's entries (:func:`resolve_terms`) and sum them into per-layer deltas.

    Example::

        row = resolve_steering([SteeringSpec("optimistic", 1.5)], registry)
        row.prompt[19]    # 1.5 * optimistic's direction at its recommended layer
    """
    return build_row(resolve_terms(specs, registry))


def _raw(vector: PersonaVector, layer: int, spec: SteeringSpec, index: int) -> float:
    """The raw-unit coefficient that adds what ``spec.coefficient`` in ``spec.unit`` means."""
    if spec.unit == "raw":
        return spec.coefficient
    norm = float(vector.direction(layer).norm())
    if norm == 0:
        raise SteeringError(f"vector '{vector.name}' is zero at layer {layer}", f"steering[{index}].layers")
    if spec.unit == "unit":
        return spec.coefficient / norm
    residual = vector.stats.get("residual_norm")
    if residual is None:
        raise SteeringError(
            f"vector '{vector.name}' has no residual-norm statistics; use unit 'raw' or 'unit'",
            f"steering[{index}].unit",
        )
    return spec.coefficient * float(residual[layer]) / norm


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
        try:
            for phase in ("prompt", "response"):
                for layer, delta in getattr(steering, phase).items():
                    ids[(layer, phase)] = entry = self._take(layer)
                    self._tables[layer][entry] = delta.to(self._tables[layer].device, self.dtype)
        except BaseException:
            # All or nothing: a row that cannot join must not keep the entries it got so far.
            self.release(ids)
            raise
        return ids

    def switch_response(self, ids: dict[tuple[int, str], int],
                        response: dict[int, torch.Tensor]) -> dict[tuple[int, str], int]:
        """A row's entries ``ids`` with its response-phase ones replaced by ``response``'s (all or
        nothing: on failure the row keeps ``ids``); returns the row's new ids."""
        added = self.add(RowSteering(response=response))
        self.release({key: entry for key, entry in ids.items() if key[1] == "response"})
        return {**{key: entry for key, entry in ids.items() if key[1] == "prompt"}, **added}

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
