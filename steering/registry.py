"""The vector registry: one directory of safetensors files for the loaded model."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from steering.atomic import atomic_write_bytes, fsync_dir, remove_stale_temp_files
from steering.store import PreconditionFailedError, SharedStore, check_precondition, content_etag
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


class Stored(NamedTuple):
    """What a write left: whether the name was new, and the vector's ETag now."""

    created: bool
    etag: str


@dataclass(frozen=True)
class _Entry:
    vector: PersonaVector
    etag: str
    stat: tuple[int, int, int]  # inode, mtime, size: a rename or rewrite by another process changes it


class VectorRegistry:
    """Vectors for one model, kept in memory and persisted one file per vector.

    Writes go through a temp file and a rename, so a crash mid-write leaves either the
    previous file or the new one. Files for another model are skipped at load, not deleted.
    Several processes may share ``directory`` (replicas on one volume): writes run under the
    store's cross-process lock, and :meth:`reload` (called by the store when another process
    wrote) swaps in a new view whole. A vector's ETag is a hash of its file, so every replica
    gives the same one.

    Example::

        reg = VectorRegistry(Path("data/vectors"), model_name="SmolLM2-135M-Instruct",
                             fingerprint=lm.fingerprint, num_layers=30, hidden_size=576)
        reg.seed_from(Path("vectors"))
        reg.get("optimistic")
    """

    def __init__(self, directory: Path, *, model_name: str, fingerprint: str, num_layers: int, hidden_size: int,
                 store: SharedStore | None = None):
        self.directory = Path(directory)
        self.model_name = model_name
        self.fingerprint = fingerprint
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.directory.mkdir(parents=True, exist_ok=True)
        # The store is the data directory that holds this one, so the monitor configuration beside
        # it shares the lock and the generation marker.
        self.store = store or SharedStore(self.directory.parent, poll_s=0)
        # Replaced whole on every change, never mutated: readers need no lock.
        self._entries: dict[str, _Entry] = {}
        self._check: Callable[[str, PersonaVector | None], None] = lambda name, vector: None
        self._changed: Callable[[], None] = lambda: None
        with self.store.lock():
            # Under the lock no other process is between writing a temp file and renaming it.
            remove_stale_temp_files(self.directory)
            self.reload()
        self.store.subscribe(self.reload)

    def guard_writes(self, check: Callable[[str, PersonaVector | None], None], changed: Callable[[], None]) -> None:
        """Make one owner of state derived from the vectors part of every write, whoever writes.

        ``check(name, vector)`` (``vector`` is None for a delete) runs before the write and refuses
        it by raising :class:`VectorInUseError`; ``changed()`` runs after. Both run under the
        store's lock, which the owner also holds while it changes its own state, so the vectors and
        what is derived from them change together.

        Example::

            registry.guard_writes(check=refuse_if_monitored, changed=recompile_monitors)
        """
        self._check, self._changed = check, changed

    def _path(self, name: str) -> Path:
        return self.directory / f"{validate_name(name)}.safetensors"

    def _fits(self, vector: PersonaVector) -> None:
        vector.check_model(self.model_name, self.fingerprint, self.num_layers, self.hidden_size)

    @staticmethod
    def _stat(path: Path) -> tuple[int, int, int]:
        st = path.stat()
        return st.st_ino, st.st_mtime_ns, st.st_size

    def reload(self) -> None:
        """Read the directory again, keeping the vectors whose files did not change."""
        old_by_file = {self._path(name): entry for name, entry in self._entries.items()}
        entries = {}
        for path in sorted(self.directory.glob("*.safetensors")):
            try:
                stat = self._stat(path)
                old = old_by_file.get(path)
                if old is not None and old.stat == stat:
                    entries[old.vector.name] = old
                    continue
                data = path.read_bytes()
                vector = PersonaVector.from_bytes(data)
                self._fits(vector)
            except (VectorFormatError, VectorModelMismatchError, OSError) as exc:
                log.warning("skipping %s: %s", path.name, exc)
                continue
            entries[vector.name] = _Entry(vector, content_etag(data), stat)
        self._entries = entries

    def seed_from(self, shipped: Path) -> list[str]:
        """Copy shipped vectors for this model that the registry does not hold yet."""
        added = []
        for path in sorted(Path(shipped).rglob("*.safetensors")):
            try:
                vector = PersonaVector.load(path)
                self._fits(vector)
            except (VectorFormatError, VectorModelMismatchError, OSError):
                continue
            try:
                # Replicas starting together on an empty volume all seed: the first one wins.
                self.put(vector, if_none_match="*")
            except PreconditionFailedError:
                continue
            added.append(vector.name)
        return added

    def names(self) -> list[str]:
        return sorted(self._entries)

    def list(self) -> list[PersonaVector]:
        entries = self._entries
        return [entries[n].vector for n in sorted(entries)]

    def get(self, name: str) -> PersonaVector:
        try:
            return self._entries[name].vector
        except KeyError:
            raise VectorNotFoundError(name) from None

    def etag(self, name: str) -> str:
        """The ETag of the stored vector ``name`` (a hash of its file); raises :class:`VectorNotFoundError`."""
        try:
            return self._entries[name].etag
        except KeyError:
            raise VectorNotFoundError(name) from None

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def put(self, vector: PersonaVector, *, if_match: str | None = None, if_none_match: str | None = None) -> Stored:
        """Store ``vector`` (replacing one of the same name) and say whether it was new.

        ``if_match`` / ``if_none_match`` are HTTP conditions on the stored vector's ETag, checked
        against the directory as it is under the lock. Raises :class:`VectorModelMismatchError`
        for a vector of another model, :class:`VectorInUseError` when the write guard refuses it
        and :class:`PreconditionFailedError` when a condition fails.
        """
        self._fits(vector)
        data = vector.to_bytes()
        with self.store.write():
            current = self._entries.get(vector.name)
            check_precondition(current.etag if current else None, if_match=if_match, if_none_match=if_none_match,
                               what=f"vector '{vector.name}'")
            self._check(vector.name, vector)
            path = self._path(vector.name)
            atomic_write_bytes(path, data)
            entry = _Entry(vector, content_etag(data), self._stat(path))
            self._entries = {**self._entries, vector.name: entry}
            self._changed()
        return Stored(current is None, entry.etag)

    def delete(self, name: str, *, if_match: str | None = None) -> None:
        """Remove a vector; raises :class:`VectorNotFoundError`, :class:`PreconditionFailedError`
        when ``if_match`` fails, or :class:`VectorInUseError` when the write guard refuses it."""
        with self.store.write():
            if name not in self._entries:
                raise VectorNotFoundError(name)
            check_precondition(self._entries[name].etag, if_match=if_match, what=f"vector '{name}'")
            self._check(name, None)
            self._path(name).unlink(missing_ok=True)
            fsync_dir(self.directory)
            self._entries = {k: v for k, v in self._entries.items() if k != name}
            self._changed()
