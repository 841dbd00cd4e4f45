"""The data directory as a store that several server processes share (replicas on one volume).

Each part of the store (vectors, monitors, adapters) keeps an immutable in-memory view of its
files and replaces it whole, so a request that took a view never sees half of a change. What
keeps replicas in step:

- **One writer at a time**: every read-modify-write runs under :meth:`SharedStore.lock`, a
  thread lock plus ``fcntl.flock`` on ``<root>/.lock`` (held across processes, released by the
  kernel if the holder dies; on NFS v4 Linux maps it to a byte-range lock the server arbitrates).
- **Fresh before a write**: on taking the lock the store reloads every part if another process
  changed anything since this one last looked, so a conditional write (:func:`check_precondition`)
  compares against what is on disk, never against a stale copy.
- **A generation marker**: ``<root>/.generation`` counts writes. A writer bumps it before it
  changes any file, so a crash mid-write still makes the others reload. Each process polls it
  every ``poll_s`` seconds and reloads on a change: every replica sees a write within
  ``poll_s`` plus the reload (milliseconds for vectors and monitors).

Example::

    store = SharedStore(Path("data"), poll_s=1.0)
    registry = VectorRegistry(Path("data/vectors"), ..., store=store)   # subscribes its reload
    with store.write():
        ...   # check If-Match against the fresh view, write files atomically
    store.watch()   # a daemon thread that reloads on others' writes
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from steering.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
GENERATION_FILE = ".generation"


class PreconditionFailedError(Exception):
    """A conditional write (``If-Match`` / ``If-None-Match``) whose condition does not hold now:
    the resource changed since the client read it (HTTP 412)."""

    def __init__(self, message: str, param: str = "If-Match"):
        super().__init__(message)
        self.param = param


def content_etag(data: bytes) -> str:
    """A strong validator for a stored representation: the same bytes give the same tag on every
    replica, with no shared counter to keep."""
    return hashlib.sha256(data).hexdigest()[:32]


def _tags(header: str) -> list[str]:
    return [t.strip() for t in header.split(",") if t.strip()]


def check_precondition(current: str | None, *, if_match: str | None = None, if_none_match: str | None = None,
                       what: str = "resource") -> None:
    """Raise :class:`PreconditionFailedError` unless the HTTP conditions hold for a resource whose
    current tag is ``current`` (None: it does not exist). Tags compare strongly (RFC 9110 13.1.1):
    a weak tag ``W/"..."`` never matches in ``If-Match``.

    Example::

        check_precondition('"3f2a"'.strip('"'), if_match='"3f2a"')    # passes
        check_precondition(None, if_match="*")                      # raises: nothing to match
    """
    if if_match is not None:
        tags = _tags(if_match)
        ok = current is not None and ("*" in tags or f'"{current}"' in tags)
        if not ok:
            state = "does not exist" if current is None else f'is at ETag "{current}"'
            raise PreconditionFailedError(f"{what} {state}, not what If-Match names: re-read it and retry")
    if if_none_match is not None and current is not None:
        tags = _tags(if_none_match)
        if "*" in tags or f'"{current}"' in tags:
            raise PreconditionFailedError(f"{what} already exists (ETag \"{current}\") and If-None-Match refuses it",
                                          "If-None-Match")


class SharedStore:
    """The lock, the generation marker and the reload fan-out for one data directory.

    Parts register a reload callback with :meth:`subscribe`; callbacks run in registration order
    (vectors before the monitors derived from them), under the lock.
    """

    def __init__(self, root: Path, *, poll_s: float = 1.0):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.poll_s = poll_s
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._fd: int | None = None
        self._bumped = False
        self._reloads: list[Callable[[], None]] = []
        self._seen = self.generation()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    # ---- the cross-process lock ----

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the store exclusively (reentrant within a thread). A ``flock`` belongs to the open
        file, which every thread of this process shares, so the thread lock is taken first."""
        with self._thread_lock:
            if self._depth == 0:
                self._fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX)
                except BaseException:
                    os.close(self._fd)
                    raise
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    os.close(self._fd)  # closing the file releases the flock
                    self._fd, self._bumped = None, False

    @contextmanager
    def write(self) -> Iterator[None]:
        """The lock, with this process's view brought up to date first and the generation bumped
        once per outermost hold (before any file changes, so a writer that dies halfway still
        makes the others reload)."""
        with self.lock():
            self.sync()
            if not self._bumped:
                generation = self.generation() + 1
                atomic_write_bytes(self.root / GENERATION_FILE, str(generation).encode())
                self._seen, self._bumped = generation, True
            yield

    # ---- generations and reloads ----

    def generation(self) -> int:
        """The count of writes made to the store so far (0 for a new one)."""
        try:
            return int((self.root / GENERATION_FILE).read_text() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def subscribe(self, reload: Callable[[], None]) -> None:
        self._reloads.append(reload)

    def sync(self) -> bool:
        """Reload every part if the store changed since this process last looked; True if it did.
        Costs one small file read when nothing changed."""
        if self.generation() == self._seen:
            return False  # an unlocked peek: most calls find nothing and never wait for a writer
        with self.lock():
            generation = self.generation()
            if generation == self._seen:
                return False
            for reload in self._reloads:
                reload()
            self._seen = generation
            return True

    def watch(self) -> None:
        """Poll the generation every ``poll_s`` seconds in a daemon thread (``poll_s`` 0: never)."""
        if self.poll_s <= 0 or self._watcher is not None:
            return
        self._watcher = threading.Thread(target=self._poll, name="store-watch", daemon=True)
        self._watcher.start()

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.sync()
            except Exception:  # a bad moment on a network volume must not end the watch
                log.exception("store reload failed; retrying in %.1f s", self.poll_s)

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
            self._watcher = None
