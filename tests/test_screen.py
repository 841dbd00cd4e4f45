"""Training-data screening: flattering answers rank at the top for the sycophancy vector."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from steering.chat import chat_prompt_ids
from steering.screen import MAX_LINE_BYTES, SampleError, jsonl_lines, parse_line
from tests.conftest import wait_job

DATA = Path(__file__).parent / "data" / "screen_mixed.jsonl"
LABELS = {i: json.loads(line)["label"] for i, line in enumerate(DATA.read_text().splitlines(), start=1)}


@pytest.mark.parametrize("raw,message", [
    ("{not json", "not JSON"),
    ("[1, 2]", "JSON object"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "list with a prompt"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "x"}]}', "last message"),
    ('{"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}', "messages[0]"),
    ('{"prompt": "hi"}', "expected"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}', "empty"),
])
def test_malformed_lines_say_what_is_wrong(raw, message):
    with pytest.raises(SampleError, match=re.escape(message)):
        parse_line(1, raw)


def _precision(top: list[dict], k: int) -> float:
    return sum(LABELS[t["line"]] == "sycophantic" for t in top[:k]) / k


def test_screen_job_ranks_sycophantic_samples_first(client):
    body = DATA.read_bytes() + b"{broken line\n" + b'{"prompt": "no response"}\n'
    r = client.post("/v1/screen", params={"vectors": "sycophantic,big5.conscientiousness", "top": 10, "max_new_tokens": 32},
                    content=body, headers={"content-type": "application/x-ndjson"})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "succeeded", job
    result = job["result"]
    assert result["samples"] == 40
    assert [e["line"] for e in result["errors"]] == [41, 42]
    syc = _precision(result["vectors"]["sycophantic"]["top"], 10)
    other = _precision(result["vectors"]["big5.conscientiousness"]["top"], 10)
    print(f"precision@10: sycophantic {syc:.2f}, big5.conscientiousness {other:.2f}")
    assert syc >= 0.7
    assert syc > other
    rows = [json.loads(line) for line in client.get(f"/v1/jobs/{job['id']}/output").text.splitlines()]
    assert len(rows) == 40 and {"train", "natural", "diff", "cheap_diff"} <= set(rows[0]["scores"]["sycophantic"])
    mean_syc = sum(r["scores"]["sycophantic"]["diff"] for r in rows if LABELS[r["line"]] == "sycophantic") / 10
    mean_neutral = sum(r["scores"]["sycophantic"]["diff"] for r in rows if LABELS[r["line"]] == "neutral") / 30
    assert mean_syc > mean_neutral


def test_samples_that_do_not_fit_the_context_are_reported_by_line_and_skipped(client, server):
    tok = server.state.lm.tokenizer
    context = server.state.engine.max_model_len  # the model's context within the KV-cache budget
    lines = DATA.read_bytes().splitlines(keepends=True)[:3]
    # Prompt and training response together are longer than the context.
    long_response = json.dumps({"prompt": "Hi", "response": "x " * (context + 100)}).encode() + b"\n"
    # The prompt and its training response fit, but not the prompt with a natural answer of 32 tokens.
    words = context - 20
    while len(chat_prompt_ids(tok, [{"role": "user", "content": "x " * words}])) > context - 10:
        words -= 1
    long_prompt = json.dumps({"prompt": "x " * words, "response": "Fine."}).encode() + b"\n"
    r = client.post("/v1/screen", params={"vectors": "sycophantic", "top": 5, "max_new_tokens": 32},
                    content=b"".join(lines[:2]) + long_response + long_prompt + lines[2],
                    headers={"content-type": "application/x-ndjson"})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "succeeded", job
    errors = {e["line"]: e["error"] for e in job["result"]["errors"]}
    assert sorted(errors) == [3, 4]
    assert "training response" in errors[3] and "natural answer of up to 32" in errors[4]
    assert str(context) in errors[4]
    rows = [json.loads(line) for line in client.get(f"/v1/jobs/{job['id']}/output").text.splitlines()]
    assert [row["line"] for row in rows] == [1, 2, 5] and job["result"]["samples"] == 3


def test_a_large_malformed_upload_neither_stalls_the_server_nor_grows_the_job_result(client):
    """2,000,000 malformed lines (enough that a quick machine is still reading them when the test
    polls): while the job reads them, the server keeps answering (the job is
    seen running between /health answers), and its stored result keeps the first 100 errors and
    counts them all."""
    lines = 2_000_000
    r = client.post("/v1/screen", params={"vectors": "sycophantic", "generate": "false"}, content=b"x\n" * lines,
                    headers={"content-type": "application/x-ndjson"})
    assert r.status_code == 202, r.text
    seen_running, slowest = 0, 0.0
    while (job := client.get(f"/v1/jobs/{r.json()['id']}").json())["status"] in ("queued", "running"):
        seen_running += job["status"] == "running"
        started = time.monotonic()
        assert client.get("/health").status_code == 200
        slowest = max(slowest, time.monotonic() - started)
    print(f"job seen running {seen_running} times; slowest /health answer {slowest * 1000:.0f} ms")
    # Before, the job read every line in one turn of the event loop, so no poll ever saw it running.
    assert seen_running >= 1
    assert job["status"] == "succeeded", job
    result = job["result"]
    assert result["samples"] == 0 and result["error_count"] == lines
    assert [e["line"] for e in result["errors"]] == list(range(1, 101))
    assert all("not JSON" in e["error"] for e in result["errors"])


def test_lines_are_read_in_bounded_pieces(tmp_path):
    """A line at the limit is read; one byte more is skipped unread and reported by its number."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"a" * 1023 + b"\n" + b"b" * 1024 + b"\n" + b"c" * 5000 + b"\n" + b"d" * 3000)
    got = list(jsonl_lines(path, max_line_bytes=1024))
    assert [n for n, _ in got] == [1, 2, 3, 4]
    assert got[0][1] == "a" * 1023 + "\n" and got[1][1] == "b" * 1024 + "\n"
    assert isinstance(got[2][1], SampleError) and "5001 bytes" in str(got[2][1])
    assert isinstance(got[3][1], SampleError) and "3000 bytes" in str(got[3][1])


def test_a_single_huge_line_is_reported_not_parsed(client):
    """One line of a few MB (valid JSON) is not decoded, parsed and tokenized in one go: it is an
    error naming its line and length, and the lines around it are screened."""
    huge = json.dumps({"prompt": "Say something.", "response": "word " * (MAX_LINE_BYTES // 2)})
    fine = json.dumps({"prompt": "How are you?", "response": "Fine, thanks."})
    r = client.post("/v1/screen", params={"vectors": "sycophantic", "generate": "false"},
                    content=(fine + "\n" + huge + "\n" + fine + "\n").encode(),
                    headers={"content-type": "application/x-ndjson"})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "succeeded", job
    assert job["result"]["samples"] == 2
    assert [(e["line"], "bytes long" in e["error"]) for e in job["result"]["errors"]] == [(2, True)]


def test_screen_refuses_bad_requests(client):
    assert client.post("/v1/screen", params={"vectors": "nope"}, content=b"{}\n").status_code == 404
    assert client.post("/v1/screen", params={"vectors": "sycophantic"}, content=b"").status_code == 400
    assert client.post("/v1/screen", params={"vectors": "sycophantic", "top": 0}, content=b"{}\n").status_code == 400


def test_screen_cli_cheap_variant(tmp_path):
    out = tmp_path / "report.jsonl"
    env = {**os.environ, "PERSONA_DATA_DIR": str(tmp_path / "data")}
    done = subprocess.run([sys.executable, "-m", "app.cli", "screen", str(DATA), "--vector", "sycophantic", "--top", "10",
                           "--no-generate", "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 40 and rows[0]["scores"]["sycophantic"]["diff"] is None
    assert "sycophantic: mean projection difference" in done.stdout
    ranked = sorted(rows, key=lambda r: -r["scores"]["sycophantic"]["cheap_diff"])
    assert _precision([{"line": r["line"]} for r in ranked], 10) >= 0.5
