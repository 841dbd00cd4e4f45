"""Secure by default: the CLI refuses to serve admin routes without keys on a network address,
unless PERSONA_ALLOW_UNAUTHENTICATED_ADMIN says the server is meant to be open."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from app.settings import is_loopback
from tests.conftest import CACHE_DIR, free_port, spawn_server


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "::1", "[::1]", "localhost", "LOCALHOST"])
def test_loopback_addresses(host):
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "192.168.0.7", "persona.example.com", ""])
def test_network_addresses(host):
    assert not is_loopback(host)


def test_serve_on_all_interfaces_without_admin_keys_refuses_to_start(tmp_path):
    env = {**os.environ, "PERSONA_DATA_DIR": str(tmp_path), "PERSONA_CACHE_DIR": str(CACHE_DIR),
           "PERSONA_ADMIN_KEYS": "", "PERSONA_ALLOW_UNAUTHENTICATED_ADMIN": "false"}
    port = free_port()
    out = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--host", "0.0.0.0", "--port", str(port)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "refusing to serve on 0.0.0.0" in out.stderr
    assert "PERSONA_ADMIN_KEYS" in out.stderr and "PERSONA_ALLOW_UNAUTHENTICATED_ADMIN=true" in out.stderr
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


def test_serve_on_all_interfaces_starts_when_openness_is_explicit(tmp_path):
    proc, url = spawn_server(tmp_path, PERSONA_HOST="0.0.0.0", PERSONA_ADMIN_KEYS="",
                             PERSONA_ALLOW_UNAUTHENTICATED_ADMIN="true")
    try:
        assert httpx.get(f"{url}/v1/monitors", timeout=10).status_code == 200
    finally:
        proc.terminate()
        proc.wait(60)


def test_serve_on_all_interfaces_starts_with_admin_keys_and_guards_admin_routes(tmp_path):
    proc, url = spawn_server(tmp_path, PERSONA_HOST="0.0.0.0", PERSONA_ADMIN_KEYS="sekret-admin")
    try:
        assert httpx.get(f"{url}/v1/monitors", timeout=10).status_code == 401
        ok = httpx.get(f"{url}/v1/monitors", headers={"Authorization": "Bearer sekret-admin"}, timeout=10)
        assert ok.status_code == 200
    finally:
        proc.terminate()
        proc.wait(60)
