"""Crash-safe file writes: a reader sees the old file or the new one, never a torn one."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same directory, fsync, rename.

    Example::

        atomic_write_bytes(Path("data/monitors.json"), b"{}")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(built: Path, final: Path) -> None:
    """Put the directory ``built`` at ``final`` (same filesystem), replacing an older one: the old
    one is renamed aside to ``.<name>.old-<tag>`` first, so ``final`` never holds a mix of both,
    and removed once the new one is in place. A crash in between leaves the aside copy for
    start-up recovery to put back or drop.

    Example::

        replace_dir(root / ".extravert.tmp-1a2b", root / "extravert")
    """
    old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
    if final.exists():
        os.rename(final, old)
    os.rename(built, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def remove_stale_temp_files(directory: Path) -> int:
    """Delete temp files a crashed writer left behind; returns how many."""
    removed = 0
    if not Path(directory).is_dir():
        return 0
    for tmp in Path(directory).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed
