"""Work beside chat has limits: prompt limits, a per-job deadline that cancels the job's engine
work, a cap on concurrent jobs per key (per client address without keys), and retention of
job records and their files. Each test starts its own real server with the settings it needs."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest

from steering.limits import PromptLimit, PromptTooLongError
from tests.conftest import make_server, wait_job

DATA = Path(__file__).parent / "data" / "screen_mixed.jsonl"
SMALL = b"".join(DATA.read_bytes().splitlines(keepends=True)[:2])
K1, K2, ADMIN = ({"Authorization": f"Bearer {k}"} for k in ("key-one", "key-two", "admin-key"))
KEYS = {"api_keys": ["key-one", "key-two"], "admin_keys": ["admin-key"]}


def screen(client: httpx.Client, body: bytes, headers: dict | None = None, **params) -> httpx.Response:
    query = {"vectors": "sycophantic", "top": 5, "max_new_tokens": 32, **params}
    return client.post("/v1/screen", params=query, content=body, headers={"content-type": "application/x-ndjson",
                                                                          **(headers or {})})


def engine_idle(live, within: float = 120.0) -> bool:
    """Within ``within`` seconds (a forward pass already under way is not interrupted), the engine
    has no running or queued rows left and runs no forward pass for a second."""
    engine = live.state.engine
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if engine.running == 0 and engine.waiting == 0:
            before = engine.forward_passes
            time.sleep(1.0)
            if engine.forward_passes == before:
                return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("read,generate,fits", [(8192, 0, True), (8193, 0, False), (8000, 192, True), (8000, 193, False)])
def test_prompt_limit_counts_what_is_read_and_generated(read, generate, fits):
    limit = PromptLimit(context_length=8192)
    if fits:
        limit.check(read, generate=generate)
    else:
        with pytest.raises(PromptTooLongError):
            limit.check(read, generate=generate)


def test_max_prompt_tokens_caps_reads_but_never_raises_the_context():
    with pytest.raises(PromptTooLongError, match="at most 100"):
        PromptLimit(8192, max_prompt_tokens=100).check(101, param="x")
    with pytest.raises(PromptTooLongError, match="at most 8192"):
        PromptLimit(8192, max_prompt_tokens=10**6).check(8193)


def test_a_job_past_its_deadline_fails_and_its_engine_work_is_cancelled(lm, tmp_path):
    with make_server(lm, tmp_path, job_timeout_s=2) as live, httpx.Client(base_url=live.url, timeout=120) as c:
        started = time.monotonic()
        r = screen(c, DATA.read_bytes())
        assert r.status_code == 202, r.text
        job = wait_job(c, r.json()["id"], timeout=120)
        assert job["status"] == "failed", job
        assert "deadline of 2 s" in job["error"], job["error"]
        assert job["progress"]["done"] < 40  # stopped part way, not after the whole set
        failed_after = time.monotonic() - started
        assert failed_after < 30
        assert engine_idle(live), "the job's engine requests kept running after its deadline"
        print(f"screening job with a 2 s deadline: failed after {failed_after:.1f} s, "
              f"engine idle after {time.monotonic() - started - 1:.1f} s")
        assert c.get(f"/v1/jobs/{job['id']}/output").status_code == 404
        assert list((tmp_path / "jobs").iterdir()) == []  # the spool and the partial output went with it

        # Synchronous work beside chat has the same deadline: 504, and its engine work is cancelled too.
        slow = c.post("/v1/assess", json={"inventory": "mbti", "repetitions": 20})
        assert slow.status_code == 504, slow.text
        assert slow.json()["error"]["code"] == "deadline_exceeded"
        assert engine_idle(live)
        # The server is unharmed: a chat request right after is answered.
        chat = c.post("/v1/chat/completions", json={"model": "default", "max_tokens": 4,
                                                    "messages": [{"role": "user", "content": "Hi"}]})
        assert chat.status_code == 200


def test_concurrent_jobs_are_capped_per_key(lm, tmp_path):
    with make_server(lm, tmp_path, job_timeout_s=3, max_jobs_per_key=1, **KEYS) as live, \
            httpx.Client(base_url=live.url, timeout=120, headers=ADMIN) as c:  # each request below names its key
        first = screen(c, DATA.read_bytes(), K1)
        assert first.status_code == 202, first.text
        again = screen(c, DATA.read_bytes(), K1)
        assert again.status_code == 429, again.text
        assert again.headers["Retry-After"] == "1"
        assert again.json()["error"]["type"] == "rate_limit_error"
        assert again.json()["error"]["code"] == "too_many_jobs"
        assert "key-one" not in again.text
        # The same key cannot get around the cap with synchronous work beside chat.
        assess = c.post("/v1/assess", json={"inventory": "mbti", "repetitions": 2}, headers=K1)
        assert assess.status_code == 429
        # Another key has its own allowance; an admin's calibration counts against the admin key.
        other = screen(c, DATA.read_bytes(), K2, generate="false")
        assert other.status_code == 202, other.text
        extract = c.post("/v1/vectors/extract", json={"trait_name": "optimistic", "sweep": False,
                                                      "method": "contrastive_texts"}, headers=ADMIN)
        assert extract.status_code == 202, extract.text
        calibrate = c.post("/v1/monitors/optimistic/calibrate", json={"apply": False}, headers=ADMIN)
        assert calibrate.status_code == 429 and calibrate.json()["error"]["code"] == "too_many_jobs"

        for job in (first.json(), other.json(), extract.json()):
            wait_job(c, job["id"], timeout=120)
        room = screen(c, SMALL, K1, generate="false")
        assert room.status_code == 202  # room again
        wait_job(c, room.json()["id"])
        assert engine_idle(live)


def test_without_keys_jobs_are_capped_per_client_address(lm, tmp_path):
    with make_server(lm, tmp_path, job_timeout_s=3, max_jobs_per_key=1) as live, \
            httpx.Client(base_url=live.url, timeout=120) as one, \
            httpx.Client(base_url=live.url, timeout=120,
                         transport=httpx.HTTPTransport(local_address="127.0.0.2")) as two:
        first = screen(one, DATA.read_bytes())
        assert first.status_code == 202
        assert screen(one, DATA.read_bytes()).status_code == 429
        second = screen(two, DATA.read_bytes(), generate="false")
        assert second.status_code == 202, second.text
        for job in (first.json(), second.json()):
            wait_job(one, job["id"], timeout=120)
        assert engine_idle(live)


def test_finished_jobs_beyond_the_count_are_forgotten_with_their_files(lm, tmp_path):
    jobs_dir = tmp_path / "jobs"
    jobs_dir.mkdir()
    stale = jobs_dir / "upload-from-an-earlier-process.jsonl"
    stale.write_text("{}\n")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    with make_server(lm, tmp_path, max_jobs_kept=2, job_ttl_s=3600) as live, \
            httpx.Client(base_url=live.url, timeout=120) as c:
        assert not stale.exists()  # an earlier process's leftover, older than the TTL
        ids = []
        for _ in range(3):
            r = screen(c, SMALL, generate="false")
            assert r.status_code == 202, r.text
            assert wait_job(c, r.json()["id"])["status"] == "succeeded"
            ids.append(r.json()["id"])
        assert c.get(f"/v1/jobs/{ids[0]}").status_code == 404  # the oldest beyond the count
        assert c.get(f"/v1/jobs/{ids[0]}/output").status_code == 404
        for job_id in ids[1:]:
            assert len(c.get(f"/v1/jobs/{job_id}/output").text.splitlines()) == 2
        assert sorted(p.name for p in jobs_dir.iterdir()) == sorted(f"{i}.out.jsonl" for i in ids[1:])


def test_finished_jobs_expire_after_the_ttl_with_their_files(lm, tmp_path):
    ttl = 3
    with make_server(lm, tmp_path, job_ttl_s=ttl) as live, httpx.Client(base_url=live.url, timeout=120) as c:
        r = screen(c, SMALL, generate="false")
        job = wait_job(c, r.json()["id"])
        assert job["status"] == "succeeded"
        output = tmp_path / "jobs" / f"{job['id']}.out.jsonl"
        assert output.exists()
        # No request touches the store from here on: the TTL alone removes the record and its file.
        deadline = time.monotonic() + ttl + 30
        while output.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        gone = time.time()
        assert not output.exists()
        assert gone >= job["finished"] + ttl - 1  # not before its time (``finished`` is whole seconds)
        assert list((tmp_path / "jobs").iterdir()) == []
        assert c.get(f"/v1/jobs/{job['id']}").status_code == 404


def test_assessment_respects_the_prompt_limit(lm, tmp_path):
    with make_server(lm, tmp_path, max_prompt_tokens=40) as live, httpx.Client(base_url=live.url, timeout=120) as c:
        r = c.post("/v1/assess", json={"inventory": "mbti", "repetitions": 2})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "inventory" and r.json()["error"]["code"] == "prompt_too_long"
        assert "at most 40" in r.json()["error"]["message"]


def test_a_max_prompt_tokens_above_the_context_does_not_lift_the_context_limit(lm, tmp_path):
    with make_server(lm, tmp_path, max_prompt_tokens=10**6) as live, httpx.Client(base_url=live.url, timeout=120) as c:
        r = c.post("/v1/monitors/optimistic/calibrate", json={"prompts": ["Hello there.", "x " * 9000], "apply": False})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "prompts[1]" and r.json()["error"]["code"] == "prompt_too_long"
        # The context limit is the engine's max_model_len (the model's context within the KV-cache budget).
        assert f"at most {live.state.engine.max_model_len} " in r.json()["error"]["message"]
