"""Continuous batching under concurrency: invariance, mixed steering, cancellation, limits."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import httpx
import pytest

from tests.conftest import chat, make_server

PROMPTS = [
    "Describe your morning.", "What is the capital of France?", "Tell me about your job.",
    "Write a short poem about rain.", "How do you feel about the next year?", "Give me a tip for cooking rice.",
    "Why is the sky blue?", "Name three animals that live in the sea.",
]
MIXES = [
    None,
    {"optimistic": 1.0},
    {"optimistic": -1.5},
    [{"vector": "optimistic", "coefficient": 2.0, "layers": [12]}],
    [{"vector": "optimistic", "coefficient": 1.0, "layers": [15, 22]}, {"vector": "optimistic", "coefficient": -0.5}],
    [{"vector": "optimistic", "coefficient": 3.0, "positions": "prompt"}],
    [{"vector": "optimistic", "coefficient": -2.0, "positions": "response", "unit": "raw"}],
    [{"vector": "optimistic", "coefficient": 40.0, "unit": "unit", "layers": [19]}],
]


def _completion(client, prompt, steering=None, **fields):
    body = {"max_tokens": 32, **fields}
    if steering is not None:
        body["steering"] = steering
    response = chat(client, prompt, **body)
    assert response.status_code == 200, response.text
    return response.json()


def test_greedy_output_is_the_same_alone_and_amid_15_differently_steered_requests(client):
    target = {"optimistic": 1.5}
    alone = _completion(client, PROMPTS[0], target)["choices"][0]["message"]["content"]
    barrier = threading.Barrier(16)

    def run(i):
        barrier.wait()
        if i == 0:
            return _completion(client, PROMPTS[0], target)
        return _completion(client, PROMPTS[i % len(PROMPTS)], MIXES[i % len(MIXES)], max_tokens=16 + 4 * (i % 5))

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(run, range(16)))
    assert results[0]["choices"][0]["message"]["content"] == alone


def test_32_mixed_concurrent_requests_complete_with_the_right_lengths(client):
    def run(i):
        n = 8 + (i % 4) * 8
        out = _completion(client, PROMPTS[i % len(PROMPTS)], MIXES[i % len(MIXES)], max_tokens=n,
                          ignore_eos=True, temperature=0.7, seed=i)
        return n, out

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(run, range(32)))
    for n, out in results:
        assert out["usage"]["completion_tokens"] == n
        assert out["choices"][0]["finish_reason"] == "length"


def test_seeded_request_is_reproducible_in_different_batches(client):
    fields = {"temperature": 0.9, "seed": 77, "max_tokens": 24}
    alone = _completion(client, PROMPTS[3], **fields)["choices"][0]["message"]["content"]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        noise = [pool.submit(_completion, client, PROMPTS[i], MIXES[i], temperature=1.0) for i in range(7)]
        mine = pool.submit(_completion, client, PROMPTS[3], **fields)
        [f.result() for f in noise]
    assert mine.result()["choices"][0]["message"]["content"] == alone


def test_min_tokens_and_ignore_eos_fix_the_length(client):
    short = _completion(client, "Say hi.", max_tokens=64)
    assert short["usage"]["completion_tokens"] < 64  # the model stops by itself
    forced = _completion(client, "Say hi.", max_tokens=64, ignore_eos=True)
    assert forced["usage"]["completion_tokens"] == 64
    least = _completion(client, "Say hi.", max_tokens=64, min_tokens=40)
    assert least["usage"]["completion_tokens"] >= 40


def _wait_idle(state, timeout=20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if state.engine.running == 0 and state.engine.waiting == 0:
            return True
        time.sleep(0.05)
    return False


def test_streaming_client_disconnect_frees_its_row(server):
    body = {"model": "default", "messages": [{"role": "user", "content": "Tell a long story."}],
            "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: {") for line in got)
            assert server.state.engine.running == 1
    assert _wait_idle(server.state)


def test_non_streaming_client_disconnect_frees_its_row(server):
    body = {"model": "default", "messages": [{"role": "user", "content": "Tell a long story."}],
            "max_tokens": 2000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=1.5))
    assert _wait_idle(server.state)
    assert httpx.get(f"{server.url}/ready").status_code == 200


def test_full_queue_answers_429_with_retry_after(lm, tmp_path):
    with make_server(lm, tmp_path, max_batch_size=1, max_waiting=1) as live:
        long = {"model": "default", "messages": [{"role": "user", "content": "Talk."}], "max_tokens": 150, "ignore_eos": True}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(httpx.post, f"{live.url}/v1/chat/completions", json=long, timeout=120)
            while live.state.engine.running < 1:
                time.sleep(0.02)
            second = pool.submit(httpx.post, f"{live.url}/v1/chat/completions", json={**long, "max_tokens": 4}, timeout=120)
            while live.state.engine.waiting < 1:
                time.sleep(0.02)
            third = httpx.post(f"{live.url}/v1/chat/completions", json={**long, "max_tokens": 4}, timeout=30)
            assert third.status_code == 429
            assert int(third.headers["retry-after"]) >= 1
            assert third.json()["error"]["code"] == "queue_full"
            assert first.result().status_code == 200 and second.result().status_code == 200


def test_deadline_ends_a_request_with_a_clear_error_and_the_server_recovers(lm, tmp_path):
    with make_server(lm, tmp_path, request_timeout_s=2.0) as live:
        body = {"model": "default", "messages": [{"role": "user", "content": "Talk."}], "max_tokens": 2000, "ignore_eos": True}
        response = httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "deadline_exceeded"
        assert _wait_idle(live.state)
        ok = httpx.post(f"{live.url}/v1/chat/completions", json={**body, "max_tokens": 3}, timeout=60)
        assert ok.status_code == 200
