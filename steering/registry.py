"""The vector registry: one directory of safetensors files for the loaded model."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from steering.atomic import fsync_dir, remove_stale_temp_files
from steering.vector import (
    PersonaVector,
    VectorFormatError,
    VectorModelMismatchError,
    validate_name,
)

log = logging.getLogger(__name__)


class VectorNotFoundError(KeyError):
    """No vector of that name in the registry."""

    def __str__(self) -> str:
        return f"vector '{self.args[0]}' not found"


class VectorInUseError(ValueError):
    """A vector write that would leave state derived from the vector wrong (HTTP 409), e.g. a
    z-score monitor on a vector without neutral statistics; the message names what refused it."""


class VectorRegistry:
    """Vectors for one model, kept in memory and persisted one file per vector.

    Writes go through a temp file and a rename, so a crash mid-write leaves either the
    previous file or the new one. Files for another model are skipped at load, not deleted.

    Example::

        reg = VectorRegistry(Path("data/vectors"), model_name="SmolLM2-135M-Instruct",
                             fingerprint=lm.fingerprint, num_layers=30, hidden_size=576)
        reg.seed_from(Path("vectors"))
        reg.get("optimistic")
    """

    def __init__(self, directory: Path, *, model_name: str, fingerprint: str, num_layers: int, hidden_size: int):
        self.directory = Path(directory)
        self.model_name = model_name
        self.fingerprint = fingerprint
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self._vectors: dict[str, PersonaVector] = {}
        # Reentrant: the owner of derived state (the monitor set) takes it for its own writes and
        # is called back under it from ours.
        self.lock = threading.RLock()
        self._check: Callable[[str, PersonaVector | None], None] = lambda name, vector: None
        self._changed: Callable[[], None] = lambda: None
        self.directory.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(self.directory)
        self._load_all()

    def guard_writes(self, check: Callable[[str, PersonaVector | None], None], changed: Callable[[], None]) -> None:
        """Make one owner of state derived from the vectors part of every write, whoever writes.

        ``check(name, vector)`` (``vector`` is None for a delete) runs before the write and refuses
        it by raising :class:`VectorInUseError`; ``changed()`` runs after. Both run under
        :attr:`lock`, which the owner also holds while it changes its own state, so the vectors and
        what is derived from them change together.

        Example::

            registry.guard_writes(check=refuse_if_monitored, changed=recompile_monitors)
        """
        self._check, self._changed = check, changed

    def _path(self, name: str) -> Path:
        return self.directory / f"{validate_name(name)}.safetensors"

    def _fits(self, vector: PersonaVector) -> None:
        vector.check_model(self.model_name, self.fingerprint, self.num_layers, self.hidden_size)

    def _load_all(self) -> None:
        for path in sorted(self.directory.glob("*.safetensors")):
            try:
                vector = PersonaVector.load(path)
                self._fits(vector)
            except (VectorFormatError, VectorModelMismatchError, OSError) as exc:
                log.warning("skipping %s: %s", path.name, exc)
                continue
            self._vectors[vector.name] = vector

    def seed_from(self, shipped: Path) -> list[str]:
        """Copy shipped vectors for this model that the registry does not hold yet."""
        added = []
        for path in sorted(Path(shipped).rglob("*.safetensors")):
            try:
                vector = PersonaVector.load(path)
                self._fits(vector)
            except (VectorFormatError, VectorModelMismatchError, OSError):
                continue
            if vector.name not in self._vectors:
                self.put(vector)
                added.append(vector.name)
        return added

    def names(self) -> list[str]:
        return sorted(self._vectors)

    def list(self) -> list[PersonaVector]:
        return [self._vectors[n] for n in self.names()]

    def get(self, name: str) -> PersonaVector:
        try:
            return self._vectors[name]
        except KeyError:
            raise VectorNotFoundError(name) from None

    def __contains__(self, name: str) -> bool:
        return name in self._vectors

    def put(self, vector: PersonaVector) -> bool:
        """Store ``vector`` (replacing one of the same name); returns True when it was new.

        Raises :class:`VectorModelMismatchError` for a vector of another model and
        :class:`VectorInUseError` when the write guard refuses it.
        """
        self._fits(vector)
        with self.lock:
            self._check(vector.name, vector)
            created = vector.name not in self._vectors
            vector.save(self._path(vector.name))
            self._vectors[vector.name] = vector
            self._changed()
        return created

    def delete(self, name: str) -> None:
        """Remove a vector; raises :class:`VectorNotFoundError`, or :class:`VectorInUseError` when
        the write guard refuses it."""
        with self.lock:
            if name not in self._vectors:
                raise VectorNotFoundError(name)
            self._check(name, None)
            self._path(name).unlink(missing_ok=True)
            fsync_dir(self.directory)
            del self._vectors[name]
            self._changed()
