"""Bad input gets a 4xx in the OpenAI envelope naming the field, and the server keeps serving."""

from __future__ import annotations

import pytest

from tests.conftest import answer

USER = [{"role": "user", "content": "Hi"}]


def _body(**fields):
    return {"model": "default", "messages": USER, "max_tokens": 4, **fields}


CASES = [
    ("unknown vector", _body(steering={"no-such-vector": 1.0}), 404, "steering[0].vector"),
    ("string coefficient", _body(steering=[{"vector": "optimistic", "coefficient": "1.5"}]), 400, "steering[0].coefficient"),
    ("string coefficient, shorthand", _body(steering={"optimistic": "strong"}), 400, "steering.optimistic"),
    ("unknown position", _body(steering=[{"vector": "optimistic", "coefficient": 1, "positions": "middle"}]), 400, "steering[0].positions"),
    ("unknown unit", _body(steering=[{"vector": "optimistic", "coefficient": 1, "unit": "volts"}]), 400, "steering[0].unit"),
    ("layer out of range", _body(steering=[{"vector": "optimistic", "coefficient": 1, "layers": [31]}]), 400, "steering[0].layers"),
    ("embedding layer", _body(steering=[{"vector": "optimistic", "coefficient": 1, "layers": [0]}]), 400, "steering[0].layers"),
    ("unknown steering field", _body(steering=[{"vector": "optimistic", "coefficient": 1, "strength": 2}]), 400, "steering[0].strength"),
    ("path in vector name", _body(steering={"../etc/passwd": 1.0}), 400, "steering"),
    ("coefficient too large", _body(steering={"optimistic": 1e6}), 400, "steering[0].coefficient"),
    ("empty messages", {"model": "default", "messages": []}, 400, "messages"),
    ("wrong role", {"model": "default", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ("missing content", {"model": "default", "messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ("last message from assistant", {"model": "default", "messages": [{"role": "assistant", "content": "x"}]}, 400, "messages"),
    ("negative max_tokens", _body(max_tokens=-5), 400, "max_tokens"),
    ("zero max_tokens", _body(max_tokens=0), 400, "max_tokens"),
    ("max_tokens above the limit", _body(max_tokens=100_000), 400, "max_tokens"),
    ("temperature out of range", _body(temperature=7), 400, "temperature"),
    ("n above 16", _body(n=17), 400, "n"),
    ("unknown model", {"model": "gpt-9", "messages": USER}, 404, "model"),
    ("missing model", {"messages": USER}, 400, "model"),
    ("too many stops", _body(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("min_tokens above max_tokens", _body(min_tokens=10, max_tokens=2), 400, "min_tokens"),
]


@pytest.mark.parametrize("body,status,param", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_chat_request_is_refused_with_the_field_named(client, body, status, param):
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["param"] == param
    assert len(error["message"]) <= 500


def test_nan_and_infinity_coefficients_are_refused(client):
    for literal in ("NaN", "Infinity", "-Infinity"):
        raw = '{"model": "default", "messages": [{"role": "user", "content": "Hi"}], "steering": [{"vector": "optimistic", "coefficient": %s}]}' % literal
        response = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "steering[0].coefficient"


def test_oversized_prompt_reports_the_token_counts(client, server):
    limit = server.state.engine.max_model_len
    long_text = "word " * (limit + 50)
    response = client.post("/v1/chat/completions", json={"model": "default", "messages": [{"role": "user", "content": long_text}]})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "messages" and error["code"] == "context_length_exceeded"
    assert str(limit) in error["message"]


def test_prompt_plus_max_tokens_beyond_the_context_is_refused(client, server):
    text = "word " * (server.state.engine.max_model_len - 200)
    response = client.post("/v1/completions", json={"model": "default", "prompt": text, "max_tokens": 1000})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "max_tokens"


def test_malformed_json_and_unknown_routes_use_the_envelope(client):
    bad = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    missing = client.get("/v1/nothing-here")
    assert missing.status_code == 404 and "error" in missing.json()


def test_completion_prompt_token_ids_are_checked(client):
    response = client.post("/v1/completions", json={"model": "default", "prompt": [1, 2, 10**9]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"


def test_server_keeps_serving_after_bad_input(client):
    for _, body, _, _ in CASES:
        client.post("/v1/chat/completions", json=body)
    assert answer(client, "What is the capital of France?", max_tokens=8)
    assert client.get("/ready").status_code == 200
