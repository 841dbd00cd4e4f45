"""The server runs on jemalloc where the machine has it: `persona-server serve` re-executes itself
with the library preloaded (app/allocator.py), since under glibc's malloc its memory grew under a
long, varied load (README, *Memory over a long run*)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from app import allocator
from tests.conftest import spawn_server

JEMALLOC = allocator.find("jemalloc")
needs_jemalloc = pytest.mark.skipif(JEMALLOC is None, reason="libjemalloc2 is not installed (make install installs it)")


@needs_jemalloc
def test_server_started_by_the_cli_runs_on_jemalloc(tmp_path, monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("PERSONA_ALLOCATOR", raising=False)
    proc, _ = spawn_server(tmp_path / "data")
    try:
        # The process the client started is the one serving: the re-execution keeps its id.
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert f"/{JEMALLOC.name}" in maps
        assert str(JEMALLOC) in Path(f"/proc/{proc.pid}/environ").read_text()
    finally:
        proc.terminate()
        proc.wait(60)


@needs_jemalloc
@pytest.mark.parametrize(("asked", "expected"), [("auto", "jemalloc"), ("system", "system")])
def test_reexecution_preloads_the_chosen_allocator_once(asked, expected):
    # A process that re-executes itself as the server does, reporting what it ends up on and how often it started.
    script = ("import os, sys; from app import allocator; print('start', flush=True); "
              "allocator.reexec_with_allocator(); print(allocator.in_effect(), os.environ.get('LD_PRELOAD', ''))")
    env = {**{k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}, "PERSONA_ALLOCATOR": asked}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1], check=True).stdout.split("\n")
    assert out.count("start") == (2 if expected == "jemalloc" else 1)
    assert out[-2].split(" ")[0] == expected


def test_preload_environment_puts_the_allocator_first_and_never_loops(tmp_path):
    (tmp_path / "libjemalloc.so.2").write_bytes(b"")
    (tmp_path / "libtcmalloc_minimal.so.4").write_bytes(b"")
    env = allocator.preload_environment({"LD_PRELOAD": "/opt/libother.so"}, [tmp_path])
    assert env["LD_PRELOAD"] == f"{tmp_path}/libjemalloc.so.2 /opt/libother.so"
    assert allocator.preload_environment(env, [tmp_path]) is None
    assert allocator.preload_environment({"LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4"}, [tmp_path]) is None
    assert allocator.preload_environment({"PERSONA_ALLOCATOR": "system"}, [tmp_path]) is None
    assert allocator.choose({"PERSONA_ALLOCATOR": "tcmalloc"}, [tmp_path])[0] == "tcmalloc"
    assert allocator.choose({}, []) == ("system", None)
    with pytest.raises(ValueError, match="PERSONA_ALLOCATOR"):
        allocator.choose({"PERSONA_ALLOCATOR": "mimalloc"}, [tmp_path])
