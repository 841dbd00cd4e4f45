"""Shared fixtures: one loaded default model per session, and real servers on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from app.main import create_app
from app.settings import Settings
from steering.engine import Engine
from steering.model import load_model
from steering.runner import EngineRunner

CACHE_DIR = Path(os.environ.get("PERSONA_CACHE_DIR", Path.home() / ".cache" / "persona-server"))
REPO_VECTORS = Path(__file__).resolve().parents[1] / "vectors"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """A real uvicorn server in a thread of the test process, on a free loopback port."""

    def __init__(self, app, ready_timeout: float = 60.0):
        self.ready_timeout = ready_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self._thread.start()
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline and self._thread.is_alive():
            try:
                if httpx.get(f"{self.url}/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("server did not become ready")

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(30)

    @property
    def state(self):
        return self.app.state.server


@pytest.fixture(scope="session")
def lm():
    return load_model("default", dtype="float32", device="cpu", cache_dir=CACHE_DIR)


@pytest.fixture(scope="module")
def runner(lm):
    """An engine of its own on the shared model, for extraction and evaluation code (per module)."""
    engine = Engine(lm, max_batch_size=32, max_waiting=256)
    engine.start()
    yield EngineRunner(engine)
    engine.shutdown()


def make_server(lm, data_dir: Path, **overrides) -> LiveServer:
    settings = Settings(data_dir=data_dir, cache_dir=CACHE_DIR, **overrides)
    # vLLM's engine starts a process and loads its own copy of the model.
    return LiveServer(create_app(settings, lm=lm), ready_timeout=600 if settings.engine == "vllm" else 60)


@pytest.fixture(scope="session")
def server(lm, tmp_path_factory):
    with make_server(lm, tmp_path_factory.mktemp("data")) as live:
        yield live


@pytest.fixture()
def client(server):
    # Generous: an assessment is a few hundred prefills, slow on a busy 2-core machine.
    with httpx.Client(base_url=server.url, timeout=300) as c:
        yield c


@pytest.fixture()
def oai(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=120, max_retries=0)


def chat(client: httpx.Client, content: str, **fields) -> httpx.Response:
    body = {"model": "default", "messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 24}
    body.update(fields)
    return client.post("/v1/chat/completions", json=body)


def answer(client: httpx.Client, content: str, **fields) -> str:
    response = chat(client, content, **fields)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def spawn_server(data_dir: Path, **env_overrides: str) -> tuple[subprocess.Popen, str]:
    """``persona-server serve`` as its own process on a free port; returns once it is ready."""
    port = free_port()
    env = {**os.environ, "PERSONA_DATA_DIR": str(data_dir), "PERSONA_CACHE_DIR": str(CACHE_DIR),
           "PERSONA_LOG_LEVEL": "warning", **env_overrides}
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError("server process did not become ready")
        time.sleep(0.2)


def wait_job(client: httpx.Client, job_id: str, timeout: float = 600) -> dict:
    """Poll ``/v1/jobs/{id}`` until it succeeds or fails."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")
