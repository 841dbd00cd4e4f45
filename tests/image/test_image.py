"""The built image, run as a user would: ``make image-test`` (not part of ``make test``).

Runs IMAGE (default persona-server:latest) with buildah, whose containers share the host network,
so the server answers on 127.0.0.1. Without admin keys it must refuse to start; with them it runs
as a non-root user, turns ready, serves a steered chat completion, /metrics, an MBTI assessment and
a built-in calibration (the packaged data is there), and on SIGTERM finishes the request in flight,
then exits. Prints the image size and the time to ready.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

IMAGE = os.environ.get("IMAGE", "persona-server:latest")
ADMIN_KEY = "image-test-admin-key"
CHAT = "/v1/chat/completions"

if shutil.which("buildah") is None or shutil.which("podman") is None:
    raise RuntimeError("the image test runs the image with buildah and podman: `make image` installs them")


def _buildah(*args: str) -> str:
    return subprocess.run(["buildah", *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def image() -> dict:
    """The image's configuration as buildah reports it."""
    return json.loads(_buildah("inspect", "--type", "image", IMAGE))


@contextmanager
def _container(env: dict[str, str]) -> Iterator[str]:
    name = _buildah("from", "--pull-never", IMAGE)
    try:
        for key, value in env.items():
            _buildah("config", "--env", f"{key}={value}", name)
        yield name
    finally:
        _buildah("rm", name)


def _run(name: str, command: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(["buildah", "run", "--isolation", "chroot", name, "--", *command],
                                stdout=out, stderr=subprocess.STDOUT)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _server_process(launcher: subprocess.Popen) -> int:
    """The persona-server process under `buildah run` (the innermost match: buildah's chroot
    wrapper carries the same command line)."""
    found = []
    for pid in _descendants(launcher.pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(arg.endswith(b"persona-server") for arg in argv) and b"serve" in argv:
            found.append(pid)
    assert found, "no persona-server process under buildah run"
    return found[-1]


def _uids(pid: int) -> set[int]:
    line = next(l for l in Path(f"/proc/{pid}/status").read_text().splitlines() if l.startswith("Uid:"))
    return {int(u) for u in line.split()[1:]}


def _size_bytes() -> int:
    out = subprocess.run(["podman", "image", "inspect", "--format", "{{.Size}}", IMAGE], check=True,
                         capture_output=True, text=True).stdout
    return int(out.strip())


def test_image_declares_a_non_root_user_an_entrypoint_and_a_healthcheck(image):
    config = image["Docker"]["config"]
    assert config["User"] not in ("", "0", "root")
    assert config["Entrypoint"] == ["persona-server", "serve"]
    assert "/ready" in " ".join(config["Healthcheck"]["Test"])
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["PERSONA_HOST"] == "0.0.0.0" and "PERSONA_ADMIN_KEYS" not in env


def test_image_refuses_to_serve_the_network_without_admin_keys(image, tmp_path):
    entrypoint = image["Docker"]["config"]["Entrypoint"]
    with _container({"PERSONA_PORT": str(free_port())}) as name:
        proc = _run(name, entrypoint, tmp_path / "refused.log")
        assert proc.wait(120) != 0
    assert "refusing to serve on 0.0.0.0" in (tmp_path / "refused.log").read_text()


def test_image_serves_then_drains_on_sigterm(image, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    log = tmp_path / "server.log"
    # A long drain timeout: on a busy shared CPU 30 tokens can take longer than the default 30 s.
    env = {"PERSONA_PORT": str(port), "PERSONA_ADMIN_KEYS": ADMIN_KEY, "PERSONA_DRAIN_NOTICE_S": "1.5",
           "PERSONA_DRAIN_TIMEOUT_S": "300"}
    with _container(env) as name:
        started = time.monotonic()
        launcher = _run(name, image["Docker"]["config"]["Entrypoint"], log)
        try:
            ready_s = _wait_ready(url, launcher, log) - started
            server = _server_process(launcher)
            assert 0 not in _uids(server), "the server runs as root"

            with httpx.Client(base_url=url, timeout=300) as client:
                steering_range = client.get("/v1/vectors/optimistic").json()["coefficient_range"]
                body = {"model": "default", "messages": [{"role": "user", "content": "Describe a rainy Monday."}],
                        "temperature": 0, "max_tokens": 24}
                plain = client.post(CHAT, json=body)
                steered = client.post(CHAT, json={**body, "steering": {"optimistic": steering_range[1]}})
                assert plain.status_code == 200 and steered.status_code == 200, steered.text
                assert steered.json()["choices"][0]["message"]["content"] != plain.json()["choices"][0]["message"]["content"]

                metrics = client.get("/metrics")
                assert metrics.status_code == 200
                assert 'persona_steering_requests_total{vector="optimistic"} 1.0' in metrics.text

                assessment = client.post("/v1/assess", json={"inventory": "mbti", "repetitions": 2})
                assert assessment.status_code == 200, assessment.text
                assert len(assessment.json()["type"]) == 4

                assert client.post("/v1/monitors/optimistic/calibrate", json={}).status_code == 401
                calibration = client.post("/v1/monitors/optimistic/calibrate", json={}, headers=admin)
                assert calibration.status_code == 200, calibration.text
                assert calibration.json()["source"] == "built-in neutral set"

                with concurrent.futures.ThreadPoolExecutor(1) as pool:
                    inflight = pool.submit(client.post, CHAT, json={**body, "max_tokens": 30, "ignore_eos": True})
                    while "persona_requests_running 1.0" not in client.get("/metrics").text:
                        time.sleep(0.05)
                    os.kill(server, signal.SIGTERM)
                    stopping = time.monotonic()
                    time.sleep(0.3)
                    assert httpx.get(f"{url}/ready", timeout=10).status_code == 503
                    done = inflight.result()
                assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 30
            # uvicorn shuts down, then re-raises SIGTERM to die of it; buildah says so and exits 1.
            launcher.wait(330)
            drain_s = time.monotonic() - stopping
            assert "Finished server process" in log.read_text(), log.read_text()
            assert "exited on terminated" in log.read_text() or launcher.returncode == 0, log.read_text()
        finally:
            if launcher.poll() is None:
                for pid in _descendants(launcher.pid):
                    os.kill(pid, signal.SIGKILL)
                launcher.kill()
                launcher.wait(30)
    print(f"\nimage {IMAGE}: {_size_bytes() / 1e6:.0f} MB, ready {ready_s:.1f} s after start, "
          f"drained and exited {drain_s:.1f} s after SIGTERM")


def _wait_ready(url: str, launcher: subprocess.Popen, log: Path) -> float:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if launcher.poll() is not None:
            raise AssertionError(f"the container exited with {launcher.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return time.monotonic()
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"not ready in 180 s:\n{log.read_text()}")
