"""Reliability under faults, load and hostile input (loopback only; every test bounds itself)."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from steering.monitor import MonitorSet
from tests.conftest import make_server, spawn_server

CHAT = "/v1/chat/completions"


def _body(**fields):
    return {"model": "default", "messages": [{"role": "user", "content": "Tell me about rivers."}], "max_tokens": 8, **fields}


def test_a_failing_forward_fails_only_its_requests_and_the_engine_recovers(lm, tmp_path):
    with make_server(lm, tmp_path) as live:
        engine = live.state.engine
        original = engine._forward
        # A request marked by max_tokens=7 breaks every forward it takes part in (prefill or decode);
        # a transient fault breaks one forward only.
        poison = {"prefill": False, "decode": False}
        transient = {"armed": False, "injected": 0}

        def flaky(step):
            if transient["armed"]:
                transient["armed"] = False
                transient["injected"] += 1
                raise RuntimeError("injected transient fault")
            for row in step.rows:
                kind = "decode" if row in step.decode else "prefill"
                if row.request.sampling.max_new_tokens == 7 and poison[kind]:
                    raise RuntimeError(f"injected {kind} fault")
            return original(step)

        engine._forward = flaky
        with httpx.Client(base_url=live.url, timeout=120) as c:
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                running = pool.submit(c.post, CHAT, json=_body(max_tokens=120, ignore_eos=True))
                while engine.running < 1:
                    time.sleep(0.01)
                poison["prefill"] = True  # its prefill shares a step with the running row's decode
                failed = c.post(CHAT, json=_body(max_tokens=7))
                assert failed.status_code == 500
                assert failed.json()["error"]["code"] == "engine_error" and "injected" in failed.json()["error"]["message"]
                assert running.result().status_code == 200  # the shared step was retried row by row
                assert running.result().json()["usage"]["completion_tokens"] == 120
            poison["prefill"], poison["decode"] = False, True
            broken = c.post(CHAT, json=_body(max_tokens=7, ignore_eos=True))
            assert broken.status_code == 500 and broken.json()["error"]["type"] == "server_error"
            with c.stream("POST", CHAT, json=_body(max_tokens=7, ignore_eos=True, stream=True)) as r:
                lines = [line for line in r.iter_lines() if line.startswith("data: ")]
            assert any('"error"' in line for line in lines) and lines[-1] == "data: [DONE]"
            poison["decode"] = False
            transient["armed"] = True  # a one-off fault: the step is retried and nobody notices
            healed = c.post(CHAT, json=_body(max_tokens=5))
            assert healed.status_code == 200 and transient["injected"] == 1
            after = c.post(CHAT, json=_body())
            assert after.status_code == 200 and c.get("/ready").status_code == 200


MONITOR_WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from steering.monitor import MonitorConfig, MonitorSet
    from steering.registry import VectorRegistry
    from steering.vector import PersonaVector
    vec = PersonaVector.load(Path(sys.argv[2]))
    reg = VectorRegistry(Path(sys.argv[1]) / "vectors", model_name=vec.model.name, fingerprint=vec.model.fingerprint,
                         num_layers=vec.model.num_layers, hidden_size=vec.model.hidden_size)
    reg.put(vec)
    monitors = MonitorSet(Path(sys.argv[1]) / "monitors.json", reg, num_layers=vec.model.num_layers)
    print("ready", flush=True)
    i = 0
    while True:
        i += 1
        monitors.put(MonitorConfig(vec.name, flag_threshold=float(i), block_threshold=float(i) + 0.5), who="writer")
""")


def test_kill_9_during_monitor_writes_leaves_the_last_complete_state(tmp_path, lm):
    from tests.conftest import REPO_VECTORS
    from steering.registry import VectorRegistry

    shipped = REPO_VECTORS / lm.name / "optimistic.safetensors"
    script = tmp_path / "writer.py"
    script.write_text(MONITOR_WRITER)
    root = Path(__file__).resolve().parents[1]
    for attempt in range(5):
        proc = subprocess.Popen([sys.executable, str(script), str(tmp_path), str(shipped)], stdout=subprocess.PIPE,
                                cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(0.05 + 0.05 * attempt)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        reg = VectorRegistry(tmp_path / "vectors", model_name=lm.name, fingerprint=lm.fingerprint,
                             num_layers=lm.num_layers, hidden_size=lm.hidden_size)
        monitors = MonitorSet(tmp_path / "monitors.json", reg, num_layers=lm.num_layers)
        cfg = monitors.get("optimistic")
        if cfg is not None:
            assert cfg.block_threshold == cfg.flag_threshold + 0.5  # one complete write, never a mix
        for line in (tmp_path / "audit.jsonl").read_text().splitlines()[:-1]:
            json.loads(line)  # every audit line but a torn last one parses
    with make_server(lm, tmp_path) as live:  # the server starts again on that state
        listed = httpx.get(f"{live.url}/v1/monitors").json()["data"]
        assert listed and listed[0]["block_threshold"] == listed[0]["flag_threshold"] + 0.5


def _metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_soak_above_the_queue_limit(lm, tmp_path):
    """Mixed steering and streaming at twice what batch + queue hold: only 200s and 429s,
    every accepted request completes, memory settles, metrics add up."""
    proc = psutil.Process()
    with make_server(lm, tmp_path, max_batch_size=4, max_waiting=4) as live:
        url = live.url
        mixes = [None, {"optimistic": 1.5}, {"optimistic": -1.0}, [{"vector": "optimistic", "coefficient": 2.0, "layers": [12]}]]
        before_metrics = httpx.get(f"{url}/metrics").text
        rss = {"before": proc.memory_info().rss}
        statuses: dict[int, int] = {}
        tokens = {"sum": 0}
        lock = threading.Lock()
        deadline = time.monotonic() + float(os.environ.get("PERSONA_SOAK_S", "45"))

        def worker(i: int) -> None:
            with httpx.Client(base_url=url, timeout=120) as c:
                n = 0
                while time.monotonic() < deadline:
                    n += 1
                    body = _body(max_tokens=6 + (i + n) % 10, ignore_eos=True, temperature=0.8, seed=n)
                    mix = mixes[(i + n) % len(mixes)]
                    if mix is not None:
                        body["steering"] = mix
                    if (i + n) % 2:
                        with c.stream("POST", CHAT, json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
                            code = r.status_code
                            if code == 200:
                                chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
                                used = chunks[-1]["usage"]["completion_tokens"]
                                assert used == body["max_tokens"]
                            else:
                                r.read()
                                used = 0
                    else:
                        r = c.post(CHAT, json=body)
                        code = r.status_code
                        used = r.json()["usage"]["completion_tokens"] if code == 200 else 0
                        if code == 429:
                            assert int(r.headers["retry-after"]) >= 1
                    with lock:
                        statuses[code] = statuses.get(code, 0) + 1
                        tokens["sum"] += used
                    if code == 429:
                        time.sleep(0.05)

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(worker, i) for i in range(16)]
            time.sleep(5)
            rss["during"] = proc.memory_info().rss
            for f in futures:
                f.result()
        time.sleep(1)
        rss["after"] = proc.memory_info().rss
        after_metrics = httpx.get(f"{url}/metrics").text
        assert live.state.engine.running == 0 and live.state.engine.waiting == 0
    sent = sum(statuses.values())
    report = {"sent": sent, "statuses": statuses, "rss_mb": {k: round(v / 2**20) for k, v in rss.items()}}
    print("soak:", json.dumps(report))
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.get(200, 0) > 0 and statuses.get(429, 0) > 0
    counted = _metric(after_metrics, "persona_requests_total", endpoint=CHAT) - _metric(before_metrics, "persona_requests_total", endpoint=CHAT)
    assert counted == sent
    assert _metric(after_metrics, "persona_requests_total", endpoint=CHAT, status="429") - \
        _metric(before_metrics, "persona_requests_total", endpoint=CHAT, status="429") == statuses[429]
    generated = _metric(after_metrics, "persona_generation_tokens_total") - _metric(before_metrics, "persona_generation_tokens_total")
    assert generated == tokens["sum"]
    assert rss["after"] - rss["before"] < 300 * 2**20, report  # no per-request leak


def test_sigterm_drains_in_flight_requests_then_exits(tmp_path):
    proc, url = spawn_server(tmp_path, PERSONA_DRAIN_NOTICE_S="1.5", PERSONA_DRAIN_TIMEOUT_S="60")
    try:
        with httpx.Client(base_url=url, timeout=120) as c, concurrent.futures.ThreadPoolExecutor(1) as pool:
            inflight = pool.submit(c.post, CHAT, json=_body(max_tokens=60, ignore_eos=True))
            while httpx.get(f"{url}/metrics").text.find("persona_requests_running 1.0") < 0:
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with httpx.Client(base_url=url, timeout=10) as fresh:
                assert fresh.get("/ready").status_code == 503
                refused = fresh.post(CHAT, json=_body())
                assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
                assert int(refused.headers["retry-after"]) >= 1
            done = inflight.result()
            assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 60
        # uvicorn re-raises the signal once shut down, so the exit status is SIGTERM's (or 0).
        assert proc.wait(60) in (0, -signal.SIGTERM)
        assert not list((tmp_path / "vectors").glob(".*.tmp"))
    finally:
        if proc.poll() is None:
            proc.kill()


def _access_lines(caplog) -> list[dict]:
    return [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "persona_server.access"]


def test_access_log_is_one_json_line_per_request_with_the_request_id(client, caplog):
    with caplog.at_level(logging.INFO, logger="persona_server.access"):
        r = client.post(CHAT, json=_body(max_tokens=3), headers={"X-Request-Id": "trace-123"})
        mine = [line for line in _access_lines(caplog) if line["request_id"] == "trace-123"]
    assert r.headers["x-request-id"] == "trace-123"
    assert len(mine) == 1
    entry = mine[0]
    assert entry["status"] == 200 and entry["route"] == CHAT and entry["completion_tokens"] == 3
    assert "prompt" not in entry and "rivers" not in json.dumps(entry)  # no prompt text by default
    generated = client.get("/health")
    assert len(generated.headers["x-request-id"]) == 32
    for bad in ("has spaces in it", "x" * 200, "quote\"d"):
        assert client.get("/health", headers={"X-Request-Id": bad}).headers["x-request-id"] != bad


def test_the_access_log_line_exists_once_the_client_has_the_response(client, caplog):
    """The line used to be written after the last byte went out, so a reader holding the whole
    response could look before it existed (and the suite, under load, sometimes did)."""
    calls = [
        lambda h: client.post(CHAT, json=_body(max_tokens=2), headers=h),
        lambda h: client.post(CHAT, json=_body(max_tokens=2, stream=True), headers=h).read(),
        lambda h: client.post(CHAT, json={"model": "default"}, headers=h),
        lambda h: client.get("/health", headers=h),
        lambda h: client.get("/v1/nothing-here", headers=h),
    ]
    with caplog.at_level(logging.INFO, logger="persona_server.access"):
        for i in range(40):
            calls[i % len(calls)]({"X-Request-Id": f"order-{i}"})
            assert f"order-{i}" in {line["request_id"] for line in _access_lines(caplog)}, i


@pytest.mark.parametrize("size", [9 * 2**20, 2**20])
def test_a_chunked_body_is_held_to_the_size_limit(client, size):
    """Without a Content-Length the body is counted: over the limit 413, under it served as usual."""
    body = json.dumps(_body(max_tokens=2, user="x" * size)).encode()

    def chunks():
        for at in range(0, len(body), 64 * 1024):
            yield body[at:at + 64 * 1024]

    r = client.post(CHAT, content=chunks(), headers={"content-type": "application/json"})
    assert r.request.headers.get("transfer-encoding") == "chunked" and "content-length" not in r.request.headers
    if size > 8 * 2**20:
        assert r.status_code == 413, r.text
        assert r.json()["error"]["code"] == "payload_too_large"
        assert set(r.json()["error"]) >= {"message", "type", "param", "code"}
    else:
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 2
    assert client.get("/ready").status_code == 200


@pytest.mark.parametrize("case", ["huge", "deep", "content_type", "utf8", "unknown", "nan", "many_steering", "path"])
def test_hand_written_hostile_input(client, case):
    if case == "huge":
        r = client.post(CHAT, content=b'{"model": "default", "messages": [], "pad": "' + b"x" * (9 * 2**20) + b'"}',
                        headers={"content-type": "application/json"})
        assert r.status_code == 413
    elif case == "deep":
        r = client.post(CHAT, content=b'{"model": "default", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                        headers={"content-type": "application/json"})
        assert r.status_code == 400
    elif case == "content_type":
        r = client.post(CHAT, content=b"<xml/>", headers={"content-type": "application/xml"})
        assert r.status_code == 400
    elif case == "utf8":
        r = client.post(CHAT, content=b'{"model": "default", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
                        headers={"content-type": "application/json"})
        assert r.status_code == 400
    elif case == "unknown":
        r = client.post(CHAT, json={**_body(), "steering": [{"vector": "optimistic", "coefficient": 1, "color": "red"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "steering[0].color"
    elif case == "nan":
        r = client.post(CHAT, content=b'{"model": "default", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
                        headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    elif case == "many_steering":
        r = client.post(CHAT, json={**_body(), "steering": [{"vector": "optimistic", "coefficient": 0.1}] * 10_000})
        assert r.status_code == 400 and r.json()["error"]["param"] == "steering"
    else:
        for name in ("..%2F..%2Fetc%2Fpasswd", "a%2Fb", "%2e%2e"):
            r = client.get(f"/v1/vectors/{name}")
            assert r.status_code in (400, 404)
    assert "error" in r.json() and set(r.json()["error"]) >= {"message", "type", "param", "code"}
    assert client.get("/ready").status_code == 200


def test_the_n_choices_of_one_request_read_their_prompt_once(server, client):
    """``n: 4`` on a long prompt: the choices are submitted together and the prompt is read once,
    so the first token does not wait for four prefills one after another."""
    engine = server.state.engine
    original = engine._forward
    steps: list[list[tuple[int, int, int]]] = []

    def recording(step):
        steps.append([(row.prompt_len, a, b) for row, a, b in step.chunks])
        return original(step)

    engine._forward = recording
    try:
        response = client.post(CHAT, json=_body(messages=[{"role": "user", "content": "Tell me about rivers. " * 60}],
                                                n=4, max_tokens=2, temperature=1.0, seed=3))
    finally:
        del engine._forward
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 4
    length = response.json()["usage"]["prompt_tokens"]
    ours = [[(a, b) for n, a, b in step if n == length] for step in steps]
    assert sum(b - a for step in ours for a, b in step) == length + 3
    ends = [i for i, step in enumerate(ours) for _a, b in step if b == length]
    assert len(ends) == 4 and len(set(ends)) == 2  # the reader's last chunk, then the three copies together
