"""Persona monitoring: score the last prompt token's state against persona vectors, decide
allow / flag / remediate / block, and keep the monitor configuration safe on disk.

The math is pure (:func:`scalar_projection`, :func:`z_score`, :func:`decide`,
:func:`calibrate_thresholds`); the state is one object, :class:`MonitorSet`, which persists
atomically and appends every change to an audit log.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from steering.atomic import atomic_write_bytes
from steering.registry import VectorInUseError, VectorNotFoundError
from steering.steer import ConditionalSteering, SteeringError, SteeringSpec, SteeringTerm, build_row, resolve_terms
from steering.store import check_precondition, content_etag
from steering.vector import PersonaVector

log = logging.getLogger(__name__)

Mode = Literal["enforce", "annotate", "off"]
Score = Literal["projection", "z"]
Action = Literal["allow", "flag", "remediate", "block"]


class MonitorConfigError(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class MonitorConfig:
    """One monitor: where to read, how to score, when to act, and the steering cap for its vector.

    ``flag_threshold`` / ``block_threshold`` apply to ``score`` (``z`` by default). A score
    strictly above a threshold triggers it. ``response_threshold`` (optional) is compared with
    the running mean score over generated tokens; in ``enforce`` mode crossing it stops the
    generation with ``finish_reason: content_filter``. ``steering_min`` / ``steering_max`` cap the
    raw coefficient requests may use on this vector (``steering_max: 0`` forbids positive use).

    ``remediation`` (steering entries as a request writes them, on generated tokens only) and
    ``remediate_threshold`` go together: a score above the threshold, and not above
    ``block_threshold``, serves the request with that steering added to its generated tokens
    (conditional steering, as in CAST). The ops caps do not apply to it (it is the server's
    steering, not the client's); :func:`remediation_terms` bounds it instead.
    """

    vector: str
    layer: int | None = None
    score: Score = "z"
    flag_threshold: float | None = None
    block_threshold: float | None = None
    mode: Mode = "annotate"
    response_threshold: float | None = None
    response_min_tokens: int = 4
    steering_min: float | None = None
    steering_max: float | None = None
    remediation: list[dict] | None = None
    remediate_threshold: float | None = None

    def validate(self, vector: PersonaVector, num_layers: int) -> "MonitorConfig":
        layer = self.layer if self.layer is not None else vector.recommended_layer
        if layer is None:
            raise MonitorConfigError(f"vector '{vector.name}' has no recommended layer; give 'layer'", "layer")
        if not 1 <= layer <= num_layers:
            raise MonitorConfigError(f"layer must be in 1..{num_layers}", "layer")
        if self.score == "z" and ("neutral_mean" not in vector.stats or "neutral_std" not in vector.stats):
            raise MonitorConfigError(f"vector '{vector.name}' has no neutral statistics for z-scores; use score 'projection'", "score")
        if not vector.direction(layer).any():
            raise MonitorConfigError(f"vector '{vector.name}' is zero at layer {layer}: nothing to read there", "layer")
        for name in ("flag_threshold", "block_threshold", "response_threshold", "steering_min", "steering_max",
                     "remediate_threshold"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise MonitorConfigError(f"{name} must be finite", name)
        if self.flag_threshold is not None and self.block_threshold is not None and self.block_threshold < self.flag_threshold:
            raise MonitorConfigError("block_threshold must be at least flag_threshold", "block_threshold")
        if self.steering_min is not None and self.steering_max is not None and self.steering_min > self.steering_max:
            raise MonitorConfigError("steering_min must not exceed steering_max", "steering_min")
        if bool(self.remediation) != (self.remediate_threshold is not None):
            missing = "remediate_threshold" if self.remediation else "remediation"
            raise MonitorConfigError("remediation and remediate_threshold go together: give both or neither", missing)
        if (self.remediate_threshold is not None and self.block_threshold is not None
                and self.remediate_threshold >= self.block_threshold):
            raise MonitorConfigError("remediate_threshold must be below block_threshold (above it the request "
                                     "is blocked, so the remediation would never run)", "remediate_threshold")
        return replace(self, layer=layer)


@dataclass
class Reading:
    """One monitor's verdict on one request."""

    vector: str
    layer: int
    projection: float
    z: float | None
    score: float
    action: Action
    mode: Mode
    residual: Literal["unsteered", "steered"] = "unsteered"

    def public(self) -> dict:
        """What a client may see (no thresholds)."""
        return {k: v for k, v in asdict(self).items() if k != "vector"}


def scalar_projection(hidden: torch.Tensor, direction: torch.Tensor) -> float:
    """(h . v) / |v|: how far ``hidden`` reaches along ``direction``."""
    return float(hidden.float() @ direction.float() / direction.float().norm().clamp_min(1e-12))


def z_score(projection: float, mean: float, std: float) -> float:
    return (projection - mean) / max(std, 1e-6)


def decide(score: float, config: MonitorConfig) -> Action:
    """The policy's verdict for ``score`` (whether it is enforced depends on the mode): block
    wins over remediate, which wins over flag."""
    if config.block_threshold is not None and score > config.block_threshold:
        return "block"
    if config.remediate_threshold is not None and score > config.remediate_threshold:
        return "remediate"
    if config.flag_threshold is not None and score > config.flag_threshold:
        return "flag"
    return "allow"


def remediation_terms(config: MonitorConfig, registry, max_abs_coefficient: float = math.inf) -> list[SteeringTerm]:
    """Resolve a monitor's ``remediation`` entries (:func:`steering.steer.resolve_terms`) on
    generated tokens. Raises :class:`MonitorConfigError` naming the entry's field
    (``remediation[1].layers``), and when a coefficient, or the sum per vector and layer, passes
    ``max_abs_coefficient`` in raw units (the server's bound on any steering).

    Example::

        cfg = MonitorConfig("evil", remediation=[{"vector": "evil", "coefficient": -1.0}], remediate_threshold=1.5)
        build_row(remediation_terms(cfg, registry, 8.0)).response   # {19: -1.0 * evil's direction}
    """
    specs = []
    for i, entry in enumerate(config.remediation or ()):
        if entry.get("positions", "response") != "response":
            raise MonitorConfigError("a remediation steers generated tokens only (the prompt is read before the monitor "
                                     "decides): use positions 'response'", f"remediation[{i}].positions")
        layers = entry.get("layers")
        specs.append(SteeringSpec(entry["vector"], float(entry["coefficient"]), tuple(layers) if layers else None,
                                  "response", entry.get("unit", "raw")))
    try:
        terms = resolve_terms(specs, registry)
    except (SteeringError, VectorNotFoundError) as exc:
        param = getattr(exc, "param", "remediation").replace("steering[", "remediation[", 1)
        raise MonitorConfigError(str(exc), param) from None
    sums: dict[tuple[str, int], float] = {}
    for term in terms:
        key = (term.vector.name, term.layer)
        sums[key] = sums.get(key, 0.0) + term.raw
        if not (abs(term.raw) <= max_abs_coefficient and abs(sums[key]) <= max_abs_coefficient):
            raise MonitorConfigError(
                f"the remediation adds {sums[key]:.4g} raw units of '{key[0]}' at layer {key[1]}; this server allows "
                f"at most {max_abs_coefficient:g} (PERSONA_MAX_ABS_COEFFICIENT)", f"remediation[{term.entry}].coefficient")
    return terms


class _Substituted:
    """The registry as it would be with ``vector`` written (to check a write before it lands)."""

    def __init__(self, registry, vector: PersonaVector):
        self.registry, self.vector, self.num_layers = registry, vector, registry.num_layers

    def get(self, name: str) -> PersonaVector:
        return self.vector if name == self.vector.name else self.registry.get(name)


def calibrate_thresholds(scores: list[float], flag_rate: float, block_rate: float) -> tuple[float, float]:
    """Thresholds that exactly ``round(n * rate)`` of ``scores`` exceed (strictly), when scores are distinct.

    Example::

        calibrate_thresholds([0.1 * i for i in range(100)], 0.05, 0.01)   # 5 above flag, 1 above block
    """
    if not scores:
        raise ValueError("no scores to calibrate on")
    ordered = sorted(scores, reverse=True)

    def threshold(rate: float) -> float:
        k = min(len(ordered) - 1, max(0, round(len(ordered) * rate)))
        if k == 0:
            return ordered[0]  # nothing exceeds the maximum
        return (ordered[k] + ordered[k - 1]) / 2 if ordered[k] != ordered[k - 1] else ordered[k]

    return threshold(flag_rate), threshold(block_rate)


def config_etag(config: MonitorConfig) -> str:
    """A monitor's ETag: a hash of its canonical JSON, so every replica computes the same one."""
    return content_etag(json.dumps(asdict(config), sort_keys=True).encode())


def _serialize(configs: dict[str, MonitorConfig]) -> bytes:
    return json.dumps({"monitors": {k: asdict(v) for k, v in sorted(configs.items())}}, indent=2).encode()


def percentiles(scores: list[float]) -> dict[str, float]:
    t = torch.tensor(scores, dtype=torch.float64)
    qs = {"p1": 0.01, "p5": 0.05, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p90": 0.9, "p95": 0.95, "p99": 0.99}
    out = {k: round(float(torch.quantile(t, q)), 4) for k, q in qs.items()}
    out.update(min=round(float(t.min()), 4), max=round(float(t.max()), 4), mean=round(float(t.mean()), 4))
    return out


@dataclass
class _Compiled:
    config: MonitorConfig
    unit: torch.Tensor
    mean: float | None
    std: float | None
    remediation: dict[int, torch.Tensor] | None = None  # its response-phase deltas


class MonitorSet:
    """The active monitors, persisted in ``path`` (JSON, atomic) with an append-only audit log.

    It owns the rule that the registry and the monitors never disagree: every monitor fits its
    vector (:meth:`MonitorConfig.validate`). Monitor writes are validated here; vector writes,
    whoever makes them, pass :meth:`check_vector` through the registry's write guard, which
    refuses (409) an upload a monitor could not read and the delete of a monitored vector.

    Replicas may share the file: writes run under the registry's store lock against the
    configuration as it is on disk (conditional on an ETag when the caller gives one), and a
    write by another process is picked up by :meth:`reload` within the store's poll interval.
    Requests score under :meth:`snapshot`, which never mixes two configurations.

    Example::

        monitors = MonitorSet(Path("data/monitors.json"), registry, num_layers=30)
        monitors.put(MonitorConfig("evil", flag_threshold=2, block_threshold=4, mode="enforce"), who="ops")
        readings = monitors.snapshot().score_states({19: last_token_state})
    """

    def __init__(self, path: Path, registry, *, num_layers: int, audit_path: Path | None = None):
        self.path = Path(path)
        self.audit_path = Path(audit_path or self.path.with_name("audit.jsonl"))
        self.registry = registry
        self.store = registry.store
        self.num_layers = num_layers
        self._listeners: list[Callable[[dict[str, MonitorConfig]], None]] = []
        self._configs: dict[str, MonitorConfig] = self._read() if self.path.exists() else {}
        # The configuration and what it compiled to, swapped as one: a request's snapshot (and the
        # steering policy checked against it) never mixes a new configuration with old probes.
        self._view: tuple[dict[str, MonitorConfig], dict[str, _Compiled]] = ({}, {})
        self._recompile()
        registry.guard_writes(self.check_vector, self._recompile)
        self.store.subscribe(self.reload)

    # ---- configuration ----

    def configs(self) -> dict[str, MonitorConfig]:
        return dict(self._configs)

    def get(self, vector: str) -> MonitorConfig | None:
        return self._configs.get(vector)

    def etag(self, vector: str) -> str | None:
        """The ETag of the monitor on ``vector`` (None: no monitor), the same on every replica."""
        config = self._configs.get(vector)
        return config_etag(config) if config else None

    def list_etag(self) -> str:
        """The ETag of the whole configuration (``GET /v1/monitors``)."""
        return content_etag(_serialize(self._configs))

    def on_change(self, listener: Callable[[dict[str, MonitorConfig]], None]) -> None:
        """Call ``listener(configs)`` after every change, made here or reloaded from another process."""
        self._listeners.append(listener)

    def put(self, config: MonitorConfig, *, who: str, if_match: str | None = None,
            if_none_match: str | None = None) -> MonitorConfig:
        """Validate and store ``config``; ``if_match`` / ``if_none_match`` are HTTP conditions on
        the current monitor's ETag (:class:`PreconditionFailedError` when they fail)."""
        with self.store.write():
            old = self._configs.get(config.vector)
            check_precondition(config_etag(old) if old else None, if_match=if_match, if_none_match=if_none_match,
                               what=f"the monitor on '{config.vector}'")
            config = config.validate(self.registry.get(config.vector), self.num_layers)
            remediation_terms(config, self.registry)
            self._commit({**self._configs, config.vector: config}, who, "put", config.vector, old, config)
        return config

    def delete(self, vector: str, *, who: str, if_match: str | None = None) -> MonitorConfig:
        """Remove the monitor on ``vector``: KeyError when there is none, :class:`PreconditionFailedError`
        when ``if_match`` fails."""
        with self.store.write():
            old = self._configs.get(vector)
            if old is None:
                raise KeyError(vector)
            check_precondition(config_etag(old), if_match=if_match, what=f"the monitor on '{vector}'")
            self._commit({k: v for k, v in self._configs.items() if k != vector}, who, "delete", vector, old, None)
        return old

    def _commit(self, configs: dict[str, MonitorConfig], who: str, action: str, vector: str, old, new) -> None:
        atomic_write_bytes(self.path, _serialize(configs))
        self._audit(who, action, vector, old, new)
        self._configs = configs
        self._recompile()

    def _read(self) -> dict[str, MonitorConfig]:
        raw = json.loads(self.path.read_text())
        return {name: MonitorConfig(**cfg) for name, cfg in raw.get("monitors", {}).items()}

    def reload(self) -> None:
        """Read the configuration again (another process changed the store). A file that does not
        parse keeps the configuration in force: a hand edit gone wrong must not drop every monitor."""
        try:
            configs = self._read() if self.path.exists() else {}
        except (OSError, ValueError, TypeError) as exc:
            log.error("%s not reloaded, keeping the monitors in force: %s", self.path, exc)
            return
        self._configs = configs
        self._recompile()

    def _audit(self, who: str, action: str, vector: str, old, new) -> None:
        entry = {"ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "who": who, "action": action,
                 "vector": vector, "old": asdict(old) if old else None, "new": asdict(new) if new else None}
        self.audit_path.parent.mkdir(parents=True, exist_ok=True)
        # Appends from several replicas never interleave: the caller holds the store's lock.
        with open(self.audit_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def check_vector(self, name: str, vector: PersonaVector | None) -> None:
        """Refuse a vector write (``vector`` None: a delete) that the monitor on ``name`` could
        not read, or a remediation could not steer with; raises :class:`VectorInUseError` naming
        the monitor."""
        for other in self._configs.values():
            if not any(entry.get("vector") == name for entry in other.remediation or ()):
                continue
            if vector is None:
                raise VectorInUseError(f"the remediation of the monitor on '{other.vector}' steers with this vector; "
                                       f"change or delete that monitor first (/v1/monitors/{other.vector})")
            try:
                remediation_terms(other, _Substituted(self.registry, vector))
            except MonitorConfigError as exc:
                raise VectorInUseError(f"the remediation of the monitor on '{other.vector}' could not steer with this "
                                       f"vector: {exc}; change or delete that monitor first") from None
        config = self._configs.get(name)
        if config is None:
            return
        if vector is None:
            raise VectorInUseError(f"the monitor on '{name}' (mode '{config.mode}') reads this vector; "
                                   f"delete the monitor first (DELETE /v1/monitors/{name})")
        try:
            config.validate(vector, self.num_layers)
        except MonitorConfigError as exc:
            raise VectorInUseError(
                f"the monitor on '{name}' (mode '{config.mode}', score '{config.score}', layer {config.layer}) could "
                f"not read this vector: {exc}; change or delete the monitor first (/v1/monitors/{name})") from None

    def _recompile(self) -> None:
        configs = dict(self._configs)
        compiled = {}
        for name, cfg in configs.items():
            if name not in self.registry:
                log.warning("monitor on '%s' is inactive: no such vector", name)
                continue
            vec = self.registry.get(name)
            try:
                cfg.validate(vec, self.num_layers)
            except MonitorConfigError as exc:
                # Only state written past these checks (by hand, or by an older server) gets here.
                log.warning("monitor on '%s' is inactive: %s", name, exc)
                continue
            try:
                remedy = build_row(remediation_terms(cfg, self.registry)).response if cfg.remediation else None
            except MonitorConfigError as exc:
                log.warning("monitor on '%s' is inactive: its remediation cannot steer: %s", name, exc)
                continue
            d = vec.direction(cfg.layer)
            stats = vec.stats
            compiled[name] = _Compiled(
                cfg, d / d.norm().clamp_min(1e-12),
                float(stats["neutral_mean"][cfg.layer]) if "neutral_mean" in stats else None,
                float(stats["neutral_std"][cfg.layer]) if "neutral_std" in stats else None,
                remedy,
            )
        self._view = (configs, compiled)
        for listener in self._listeners:
            listener(dict(self._configs))

    # ---- scoring (hot path) ----

    def active(self) -> list[MonitorConfig]:
        return [c.config for c in self._view[1].values() if c.config.mode != "off"]

    def snapshot(self) -> "MonitorSnapshot":
        """The active monitors as they are now; a request keeps its snapshot, so a change made
        while it runs (even a delete) never reaches into it halfway. The snapshot also carries the
        configuration it was compiled from, so the steering policy admits a request against the
        same monitors that will read it."""
        configs, compiled = self._view
        return MonitorSnapshot([c for c in compiled.values() if c.config.mode != "off"], configs)


class MonitorSnapshot:
    """Frozen monitors for one request: the probe directions the engine projects onto, per
    layer, and the reading of those projections.

    Example::

        snap = monitors.snapshot()
        request = GenerationRequest(prompt_ids=ids, probes=snap.probes)
        ...   # the engine reports PrefillDone.projections
        readings = snap.readings(event.projections)
    """

    def __init__(self, compiled: list[_Compiled], configs: dict[str, MonitorConfig] | None = None):
        self._compiled = list(compiled)
        # Every configured monitor, active or not: ops caps on steering apply whatever the mode.
        self.configs = dict(configs) if configs is not None else {c.config.vector: c.config for c in self._compiled}
        self.enforced = sorted((c.config for c in self._compiled if c.config.mode == "enforce"),
                               key=lambda cfg: cfg.layer)
        self.probes = self._stack(self._compiled)
        self.block_above = self._limits(self._compiled)
        self.remediations = self._remediations(self._compiled)
        self.watched = [c for c in self._compiled if c.config.response_threshold is not None]
        self.response_probes = self._stack(self.watched)

    def __bool__(self) -> bool:
        return bool(self._compiled)

    @staticmethod
    def _stack(compiled: list[_Compiled]) -> dict[int, torch.Tensor]:
        by_layer: dict[int, list[torch.Tensor]] = {}
        for c in compiled:
            by_layer.setdefault(c.config.layer, []).append(c.unit)
        return {layer: torch.stack(units) for layer, units in by_layer.items()}

    @classmethod
    def _limits(cls, compiled: list[_Compiled]) -> dict[int, torch.Tensor]:
        """Per layer, each probe's enforced block threshold in projection units (inf: never blocks)."""
        limits: dict[int, list[float]] = {}
        for c, _k in cls._positions(compiled):
            cfg = c.config
            limit = math.inf
            if cfg.mode == "enforce" and cfg.block_threshold is not None:
                limit = cfg.block_threshold
                if cfg.score == "z":
                    limit = c.mean + cfg.block_threshold * max(c.std, 1e-6)
            limits.setdefault(cfg.layer, []).append(limit)
        return {layer: torch.tensor(values) for layer, values in limits.items() if any(math.isfinite(v) for v in values)}

    @classmethod
    def _remediations(cls, compiled: list[_Compiled]) -> tuple[ConditionalSteering, ...]:
        """The enforced remediations, each with its threshold in projection units, for the engine."""
        out = []
        for c, k in cls._positions(compiled):
            cfg = c.config
            if cfg.mode != "enforce" or c.remediation is None:
                continue
            limit = cfg.remediate_threshold
            if cfg.score == "z":
                limit = c.mean + cfg.remediate_threshold * max(c.std, 1e-6)
            out.append(ConditionalSteering(cfg.vector, cfg.layer, k, limit, c.remediation))
        return tuple(out)

    @staticmethod
    def _positions(compiled: list[_Compiled]):
        seen: dict[int, int] = {}
        for c in compiled:
            k = seen.get(c.config.layer, 0)
            seen[c.config.layer] = k + 1
            yield c, k

    @staticmethod
    def value(c: _Compiled, projection: float) -> tuple[float | None, float]:
        """(z, score) for a projection onto ``c``'s direction."""
        z = z_score(projection, c.mean, c.std) if c.mean is not None else None
        return z, (z if c.config.score == "z" else projection)

    def readings(self, projections: dict[int, list[float]], steered_layers: frozenset[int] = frozenset()) -> list[Reading]:
        """Every monitor's verdict from the last prompt token's projections ``layer -> [M]``."""
        out = []
        for c, k in self._positions(self._compiled):
            cfg = c.config
            proj = projections[cfg.layer][k]
            z, score = self.value(c, proj)
            steered = any(layer < cfg.layer for layer in steered_layers)
            out.append(Reading(cfg.vector, cfg.layer, round(proj, 4), None if z is None else round(z, 4),
                               round(score, 4), decide(score, cfg), cfg.mode, "steered" if steered else "unsteered"))
        return out

    def score_states(self, states: dict[int, torch.Tensor]) -> list[Reading]:
        """Readings from raw states ``layer -> [hidden]`` (projected here, on the states' device)."""
        projections = {layer: (units.to(states[layer].device, torch.float32) @ states[layer].float()).tolist()
                       for layer, units in self.probes.items()}
        return self.readings(projections)


@dataclass
class ResponseWatch:
    """Running mean score over generated tokens for the monitors of a snapshot that watch responses."""

    snapshot: MonitorSnapshot
    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0
    tripped: str | None = None

    def update(self, projections: dict[int, list[float]]) -> bool:
        """Add one generated token's projections ``layer -> [M]``; True when an enforced threshold is crossed."""
        self.count += 1
        for c, k in MonitorSnapshot._positions(self.snapshot.watched):
            cfg = c.config
            _, score = MonitorSnapshot.value(c, projections[cfg.layer][k])
            self.sums[cfg.vector] = self.sums.get(cfg.vector, 0.0) + score
            if (cfg.mode == "enforce" and self.count >= cfg.response_min_tokens
                    and self.sums[cfg.vector] / self.count > cfg.response_threshold):
                self.tripped = cfg.vector
                return True
        return False

    def means(self) -> dict[str, float]:
        return {k: round(v / self.count, 4) for k, v in self.sums.items()} if self.count else {}
