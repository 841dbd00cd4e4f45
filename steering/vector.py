"""The persona vector: per-layer directions plus what they were built for and from.

On disk a vector is one safetensors file. Tensors:

- ``directions``   float32 [num_layers + 1, hidden]; row 0 = embeddings, row L = block L output
- ``residual_norm`` float32 [num_layers + 1] (optional): mean residual-stream norm per layer
- ``neutral_mean`` / ``neutral_std`` float32 [num_layers + 1] (optional): scalar projection of the
  last prompt token onto the unit direction, over a neutral prompt set, for z-scores

The JSON metadata (name, description, model, method, recommendation) sits in the
safetensors header under the key ``persona_vector``, so a vector is always one atomic file.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from steering.atomic import atomic_write_bytes

FORMAT_VERSION = 1
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
_NAME_RE = re.compile(NAME_PATTERN)
_META_KEY = "persona_vector"
_STAT_KEYS = ("residual_norm", "neutral_mean", "neutral_std")


class VectorFormatError(ValueError):
    """The file or payload is not a valid persona vector; ``param`` names the tensor or field when one is at fault."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class VectorModelMismatchError(ValueError):
    """The vector was built for another model (fingerprint, layers or hidden size differ)."""


def validate_name(name: str) -> str:
    """Accept letters, digits, ``_ . -`` (1-64 chars, not starting with a dot): no path tricks."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise VectorFormatError(
            f"invalid vector name {name!r}: use 1-64 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit"
        )
    return name


@dataclass
class ModelRef:
    """Which model a vector belongs to."""

    name: str
    fingerprint: str
    num_layers: int
    hidden_size: int


@dataclass
class PersonaVector:
    """A named direction per layer of one model's residual stream.

    Example::

        v = PersonaVector.load(Path("vectors/SmolLM2-135M-Instruct/optimistic.safetensors"))
        v.direction(15)          # tensor [576], the raw (unnormalised) direction at layer 15
    """

    name: str
    directions: torch.Tensor
    model: ModelRef
    description: str = ""
    method: str = "unknown"
    source: dict = field(default_factory=dict)
    recommended_layer: int | None = None
    coefficient_range: tuple[float, float] | None = None
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_name(self.name)
        d = self.directions
        if not isinstance(d, torch.Tensor) or d.dim() != 2:
            raise VectorFormatError("directions must be a 2-D tensor [num_layers + 1, hidden]", "directions")
        expected = (self.model.num_layers + 1, self.model.hidden_size)
        if tuple(d.shape) != expected:
            raise VectorFormatError(
                f"directions has shape {list(d.shape)}, expected {list(expected)} "
                "(num_layers + 1 rows, row 0 = embeddings)", "directions"
            )
        # Checked after the cast: a float64 value past float32's range becomes inf there.
        self.directions = _finite(d.detach().to(torch.float32).contiguous(), "directions")
        stats = {}
        for key, value in self.stats.items():
            if key not in _STAT_KEYS or not isinstance(value, torch.Tensor) or tuple(value.shape) != (expected[0],):
                raise VectorFormatError(f"statistic '{key}' must be one of {_STAT_KEYS}, shape [{expected[0]}]", key)
            stats[key] = _finite(value.detach().to(torch.float32), key)
            # A negative spread or norm has no meaning; read as a z-score or a residual unit it would flip signs.
            if key != "neutral_mean" and (stats[key] < 0).any():
                raise VectorFormatError(f"statistic '{key}' must not be negative", key)
        self.stats = stats
        rl = self.recommended_layer
        if rl is not None and (not isinstance(rl, int) or isinstance(rl, bool) or not 1 <= rl <= self.model.num_layers):
            raise VectorFormatError(f"recommended_layer {rl!r} is not a layer in 1..{self.model.num_layers}",
                                    "recommended_layer")
        if self.coefficient_range is not None and not all(math.isfinite(x) for x in self.coefficient_range):
            raise VectorFormatError("coefficient_range must be finite numbers", "coefficient_range")

    def direction(self, layer: int) -> torch.Tensor:
        return self.directions[layer]

    def metadata(self) -> dict:
        """The JSON-safe description of this vector (everything but the tensors)."""
        return {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "description": self.description,
            "model": asdict(self.model),
            "method": self.method,
            "source": self.source,
            "recommended_layer": self.recommended_layer,
            "coefficient_range": list(self.coefficient_range) if self.coefficient_range else None,
            "stats": sorted(self.stats),
            "extra": self.extra,
        }

    def check_model(self, name: str, fingerprint: str, num_layers: int, hidden_size: int) -> None:
        """Raise :class:`VectorModelMismatchError` unless this vector fits the given model."""
        m = self.model
        if (m.num_layers, m.hidden_size) != (num_layers, hidden_size) or m.fingerprint != fingerprint:
            raise VectorModelMismatchError(
                f"vector '{self.name}' was built for model '{m.name}' "
                f"(fingerprint {m.fingerprint}, {m.num_layers} layers, hidden {m.hidden_size}); "
                f"the loaded model is '{name}' (fingerprint {fingerprint}, "
                f"{num_layers} layers, hidden {hidden_size})"
            )

    def to_bytes(self) -> bytes:
        tensors = {"directions": self.directions, **{k: v.to(torch.float32) for k, v in self.stats.items()}}
        return st_save(tensors, metadata={_META_KEY: json.dumps(self.metadata())})

    @classmethod
    def from_bytes(cls, data: bytes, *, name: str | None = None) -> "PersonaVector":
        """Parse a safetensors payload (never pickle). ``name`` overrides the stored name."""
        try:
            tensors = st_load(data)
            header_len = int.from_bytes(data[:8], "little")
            header = json.loads(data[8 : 8 + header_len])
        except Exception as exc:  # safetensors raises several types for garbage input
            raise VectorFormatError(f"not a readable safetensors file: {exc}") from exc
        raw_meta = (header.get("__metadata__") or {}).get(_META_KEY)
        if raw_meta is None:
            raise VectorFormatError(f"safetensors header has no '{_META_KEY}' metadata")
        try:
            meta = json.loads(raw_meta)
        except json.JSONDecodeError as exc:
            raise VectorFormatError(f"'{_META_KEY}' metadata is not JSON: {exc}") from exc
        if "directions" not in tensors:
            raise VectorFormatError("safetensors file has no 'directions' tensor")
        return cls.from_parts(meta, tensors["directions"], {k: tensors[k] for k in _STAT_KEYS if k in tensors}, name=name)

    @classmethod
    def from_parts(cls, meta: dict, directions: torch.Tensor, stats: dict, *, name: str | None = None) -> "PersonaVector":
        try:
            model = ModelRef(**meta["model"])
            rng = meta.get("coefficient_range")
            return cls(
                name=name or meta["name"],
                directions=directions,
                model=model,
                description=meta.get("description", ""),
                method=meta.get("method", "unknown"),
                source=meta.get("source") or {},
                recommended_layer=meta.get("recommended_layer"),
                coefficient_range=(float(rng[0]), float(rng[1])) if rng else None,
                stats=stats,
                extra=meta.get("extra") or {},
            )
        except (KeyError, TypeError) as exc:
            raise VectorFormatError(f"vector metadata is incomplete: {exc}") from exc

    def save(self, path: Path) -> None:
        """Write atomically to ``path`` (temp file, fsync, rename)."""
        atomic_write_bytes(Path(path), self.to_bytes())

    @classmethod
    def load(cls, path: Path) -> "PersonaVector":
        return cls.from_bytes(Path(path).read_bytes())


def _finite(values: torch.Tensor, name: str) -> torch.Tensor:
    """``values``, or :class:`VectorFormatError` naming the tensor and the first row with NaN or inf."""
    bad = ~torch.isfinite(values)
    if bad.any():
        row = int(bad.reshape(len(values), -1).any(dim=1).nonzero()[0])
        raise VectorFormatError(f"{name} contains NaN or inf (at layer {row})", name)
    return values
