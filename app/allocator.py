"""The server's native memory allocator: jemalloc where the system has it, the C library's malloc otherwise.

Under glibc's malloc the server's resident memory kept growing under a long, varied load (``make
soak``: about +180 MiB an hour on the AVX512-BF16 machine), while Python's own objects stayed
flat: freed native blocks (tensors of every size, oneDNN's scratch, tokenizer buffers) stay
fragmented in glibc's per-thread arenas and are seldom returned. jemalloc returns freed pages to
the system on a timer, and the same soak under it stays flat (README, *Memory over a long run*).

An allocator can only be swapped before a process starts (``LD_PRELOAD``), so ``persona-server
serve`` re-executes itself once with the library preloaded; the process id stays the same.
``PERSONA_ALLOCATOR`` chooses: ``auto`` (default: jemalloc, else tcmalloc, else the C library's),
``jemalloc``, ``tcmalloc`` or ``system`` (the C library's malloc: the process is left as started).
Only on Linux; elsewhere the process is always left as started.
"""

from __future__ import annotations

import logging
import os
import sys
import sysconfig
from pathlib import Path

CHOICES = ("auto", "jemalloc", "tcmalloc", "system")
# Shared-object names as Debian/Ubuntu (libjemalloc2, libtcmalloc-minimal4) and RPM distributions ship them.
LIBRARIES = {
    "jemalloc": ("libjemalloc.so.2", "libjemalloc.so.1", "libjemalloc.so"),
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"),
}


def library_dirs() -> list[Path]:
    """Directories searched for an allocator library, the platform's multiarch one first."""
    multiarch = sysconfig.get_config_var("MULTIARCH")
    dirs = [f"/usr/lib/{multiarch}"] if multiarch else []
    dirs += ["/usr/lib64", "/usr/lib", "/usr/local/lib", "/opt/homebrew/lib", str(Path(sys.prefix) / "lib")]
    return [Path(d) for d in dirs]


def find(name: str, dirs: list[Path] | None = None) -> Path | None:
    """The first library file of allocator ``name`` in ``dirs``, or None.

    Example::

        find("jemalloc")  # PosixPath('/usr/lib/x86_64-linux-gnu/libjemalloc.so.2') with libjemalloc2
    """
    for directory in library_dirs() if dirs is None else dirs:
        for filename in LIBRARIES[name]:
            if (directory / filename).is_file():
                return directory / filename
    return None


def choose(environ: dict[str, str], dirs: list[Path] | None = None) -> tuple[str, Path | None]:
    """The allocator ``PERSONA_ALLOCATOR`` in ``environ`` asks for and its library: ``("system", None)``
    when it asks for the C library's, nothing asked for is installed, or this is not Linux."""
    wanted = environ.get("PERSONA_ALLOCATOR", "auto").strip().lower() or "auto"
    if wanted not in CHOICES:
        raise ValueError(f"PERSONA_ALLOCATOR must be one of {', '.join(CHOICES)}, got {wanted!r}")
    if sys.platform.startswith("linux") and wanted != "system":
        for name in ("jemalloc", "tcmalloc") if wanted == "auto" else (wanted,):
            library = find(name, dirs)
            if library is not None:
                return name, library
    return "system", None


def preload_environment(environ: dict[str, str], dirs: list[Path] | None = None) -> dict[str, str] | None:
    """The environment to re-execute the server with so the chosen allocator is preloaded, or None
    when nothing is to change: the system's chosen or nothing installed, or an allocator of
    :data:`LIBRARIES` already in ``LD_PRELOAD`` (the user's choice stands, two allocators never load,
    and the re-execution ends after one round even if the loader refused the library)."""
    name, library = choose(environ, dirs)
    if library is None:
        return None
    preloaded = environ.get("LD_PRELOAD", "").replace(":", " ").split()
    if any(Path(p).name in filenames for p in preloaded for filenames in LIBRARIES.values()):
        return None
    # First in the list: an allocator must be the first to define malloc.
    return {**environ, "LD_PRELOAD": " ".join([str(library), *preloaded])}


def in_effect(maps: Path = Path("/proc/self/maps")) -> str:
    """Which allocator this process runs on, from the libraries mapped into it: ``jemalloc``,
    ``tcmalloc`` or ``system`` (also where ``/proc`` is missing)."""
    try:
        text = maps.read_text()
    except OSError:
        return "system"
    for name, filenames in LIBRARIES.items():
        if any(f"/{filename}" in text for filename in filenames):
            return name
    return "system"


def reexec_with_allocator() -> None:
    """Replace this process with itself started with the chosen allocator preloaded; returns only
    when there is nothing to change. Call it first thing in a command that serves, before threads
    or state exist: everything the process did so far is discarded."""
    try:
        env = preload_environment(dict(os.environ))
    except ValueError as exc:
        raise SystemExit(f"persona-server: {exc}") from None
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, env)


def log_in_effect() -> None:
    """Log the allocator this process runs on; a warning where jemalloc or tcmalloc was asked for
    (``auto`` included) and is not in effect."""
    log = logging.getLogger("persona_server")
    name = in_effect()
    wanted = os.environ.get("PERSONA_ALLOCATOR", "auto").strip().lower() or "auto"
    if name == "system" and wanted != "system":
        log.warning("memory allocator: the C library's malloc (jemalloc is not in effect; install libjemalloc2): "
                    "resident memory may grow slowly under a long, varied load")
    else:
        log.info("memory allocator: %s", name)
