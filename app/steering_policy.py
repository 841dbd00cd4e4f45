"""Which steering a request may use. One decision for every route that takes ``steering``
(chat, completions, assessment): the server's limits, the ops caps on monitored vectors, and
the rule that keeps an enforced monitor's reading out of the request's reach.

Every check reads the one resolution of the request that its deltas are built from
(:func:`steering.steer.resolve_terms`: vectors, layers, phases, raw coefficients).

Limits hold for the request as a whole. Entries add up (that is the contract), so every check
that bounds a coefficient bounds the resolved sum per (vector, layer, phase) in raw units, the
unit the deltas are finally built in: four entries of 1.0 are checked as 4.0, whatever unit
each entry was written in.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from app.schemas import SteeringField, steering_entries
from app.settings import Settings
from steering.monitor import MonitorSnapshot
from steering.registry import VectorRegistry
from steering.steer import RowSteering, SteeringError, SteeringSpec, SteeringTerm, build_row, resolve_terms


class SteeringPolicyError(ValueError):
    """Steering the request is not allowed to use on this server (HTTP 403); ``param`` names the entry."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass
class _Sum:
    """The raw coefficients that one (vector, layer, phase) receives, and from which entries."""

    raw: float = 0.0
    entries: list[int] = field(default_factory=list)


def admit_steering(
    value: SteeringField, registry: VectorRegistry, monitors: MonitorSnapshot, settings: Settings
) -> RowSteering | None:
    """Check a request's ``steering`` field against every rule and resolve it to per-layer deltas.

    Raises :class:`SteeringError` (400) for malformed or over-limit steering and
    :class:`SteeringPolicyError` (403) for steering that ops forbid, each naming the entry's
    field; returns ``None`` when the request does not steer.

    Example::

        admit_steering({"optimistic": 1.5}, registry, monitors.snapshot(), Settings())   # RowSteering
        admit_steering([{"vector": "optimistic", "coefficient": 1.0}] * 4, registry, monitors.snapshot(),
                       Settings(max_abs_coefficient=2.0))   # SteeringError: the sum is 4
    """
    entries = steering_entries(value)
    if len(entries) > settings.max_steering_entries:
        raise SteeringError(f"at most {settings.max_steering_entries} steering entries are allowed", "steering")
    if not entries:
        return None
    for i, entry in enumerate(entries):
        if entry.layers and len(set(entry.layers)) != len(entry.layers):
            # A repeated layer would add the entry twice there, past any per-entry bound.
            raise SteeringError("layers must not repeat; use one entry per layer, or a larger coefficient",
                                f"steering[{i}].layers")
    specs = [SteeringSpec(e.vector, e.coefficient, tuple(e.layers) if e.layers else None, e.positions, e.unit)
             for e in entries]
    terms = resolve_terms(specs, registry)
    sums = _raw_sums(terms, settings.max_abs_coefficient)
    _check_sums(sums, settings.max_abs_coefficient)
    _check_caps(sums, monitors)
    _check_enforced_monitors(terms, monitors)
    return build_row(terms)


def _raw_sums(terms: list[SteeringTerm], limit: float) -> dict[tuple, _Sum]:
    """Per (vector, layer, phase), the summed raw coefficient; each entry is bounded on its own
    too, so opposite entries cannot hide huge deltas that cancel only on paper."""
    sums: dict[tuple, _Sum] = defaultdict(_Sum)
    for term in terms:
        # Written so that a NaN (which compares false with everything) is refused too.
        if not abs(term.raw) <= limit:
            raise SteeringError(
                f"|coefficient| must be at most {limit:g} in raw units; this entry is {term.raw:.4g} raw "
                f"at layer {term.layer}", f"steering[{term.entry}].coefficient")
        for phase in term.phases:
            total = sums[(term.vector.name, term.layer, phase)]
            total.raw += term.raw
            total.entries.append(term.entry)
    return sums


def _describe(key: tuple, total: _Sum) -> str:
    vector, layer, phase = key
    entries = ", ".join(str(i) for i in total.entries)
    return f"'{vector}' at layer {layer} ({phase} positions) adds up to {total.raw:.4g} in raw units over entries {entries}"


def _check_sums(sums: dict[tuple, _Sum], limit: float) -> None:
    for key, total in sums.items():
        if abs(total.raw) > limit:
            raise SteeringError(f"steering {_describe(key, total)}; at most {limit:g} is allowed",
                                f"steering[{total.entries[-1]}].coefficient")


def _check_caps(sums: dict[tuple, _Sum], monitors: MonitorSnapshot) -> None:
    """Ops caps (``steering_min`` / ``steering_max`` on a vector's monitor, raw units) bound the sums."""
    for key, total in sums.items():
        cfg = monitors.configs.get(key[0])
        if cfg is None:
            continue
        # A small tolerance: a unit or residual coefficient converted to raw units lands a
        # rounding error away from a cap it was written to meet exactly.
        if cfg.steering_max is not None and total.raw > cfg.steering_max + 1e-9:
            raise SteeringPolicyError(
                f"steering {_describe(key, total)}; above {cfg.steering_max:g} is not allowed on this server",
                f"steering[{total.entries[-1]}].coefficient")
        if cfg.steering_min is not None and total.raw < cfg.steering_min - 1e-9:
            raise SteeringPolicyError(
                f"steering {_describe(key, total)}; below {cfg.steering_min:g} is not allowed on this server",
                f"steering[{total.entries[-1]}].coefficient")


def _check_enforced_monitors(terms: list[SteeringTerm], monitors: MonitorSnapshot) -> None:
    """Refuse prompt-phase steering below any enforced monitor's layer: it would change the state
    that monitor reads, so a request could steer itself past its block. Steering at or above every
    enforced layer, or on generated tokens only, leaves the readings alone."""
    enforced = monitors.enforced
    if not enforced:
        return
    for term in terms:
        if "prompt" not in term.phases:
            continue
        reached = next((c for c in enforced if term.layer < c.layer), None)
        if reached is not None:
            layers = ", ".join(str(c.layer) for c in enforced)
            raise SteeringPolicyError(
                f"steering at layer {term.layer} on prompt positions would change what the enforced monitor on "
                f"'{reached.vector}' reads at layer {reached.layer}; enforced monitors read layers {layers}, so "
                f"steer prompt positions at layer {enforced[-1].layer} or above, or use positions 'response'",
                f"steering[{term.entry}].layers")
