"""Bad input gets a 4xx in the OpenAI envelope naming the field, and the server keeps serving."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from tests.conftest import answer, make_server

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
    # Limits hold for the request as a whole: entries that add up, or a repeated layer.
    ("entries add up past the limit", _body(steering=[{"vector": "optimistic", "coefficient": 60.0}] * 2), 400,
     "steering[1].coefficient"),
    ("repeated layer", _body(steering=[{"vector": "optimistic", "coefficient": 60.0, "layers": [19, 19]}]), 400,
     "steering[0].layers"),
    # 20 residual units is about 180 raw on this vector: the limit is in raw units, whatever the entry's unit.
    ("residual coefficient past the limit in raw units", _body(steering=[{"vector": "optimistic", "coefficient": 20.0,
                                                                          "unit": "residual"}]), 400, "steering[0].coefficient"),
    ("seed above 64 bits", _body(seed=2**64), 400, "seed"),
    ("seed below signed 64 bits", _body(seed=-(2**63) - 1), 400, "seed"),
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


# OpenAI fields this server does not implement: refused naming the field, never ignored.
UNIMPLEMENTED = {
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
    "tool_choice": "auto",
    "parallel_tool_calls": True,
    "functions": [{"name": "f", "parameters": {}}],
    "function_call": "auto",
    "response_format": {"type": "json_object"},
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"],
    "prediction": {"type": "content", "content": "x"},
    "web_search_options": {},
    "reasoning_effort": "low",
    "frobnicate": 1,
}


@pytest.mark.parametrize("field", sorted(UNIMPLEMENTED))
def test_unimplemented_chat_fields_are_refused_by_name(client, field):
    response = client.post("/v1/chat/completions", json=_body(**{field: UNIMPLEMENTED[field]}))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and field in error["message"]


@pytest.mark.parametrize("field,value", [("echo", True), ("suffix", "x"), ("best_of", 2), ("tools", [])])
def test_unimplemented_completion_fields_are_refused_by_name(client, field, value):
    response = client.post("/v1/completions", json={"model": "default", "prompt": "Hi", "max_tokens": 2, field: value})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field


@pytest.mark.parametrize("body,param", [
    (_body(messages=[{"role": "user", "content": "Hi", "tool_calls": [{"id": "1"}]}]), "messages[0].tool_calls"),
    (_body(messages=[{"role": "user", "content": [{"type": "text", "text": "Hi", "cache_control": {}}]}]),
     "messages[0].content[0].cache_control"),
    (_body(stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}),
     "stream_options.continuous_usage_stats"),
])
def test_unknown_nested_fields_are_refused_by_path(client, body, param):
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_informational_fields_and_nulls_are_accepted(client):
    informational = {"user": "u-1", "safety_identifier": "s-1", "metadata": {"team": "qa"}, "store": False,
                     "service_tier": "auto", "prompt_cache_key": "k"}
    nulls = {"tools": None, "response_format": None, "logprobs": None, "temperature": None}
    response = client.post("/v1/chat/completions", json=_body(**informational, **nulls))
    assert response.status_code == 200, response.text
    message = {"role": "assistant", "content": "Hello.", "refusal": None, "tool_calls": None}
    history = _body(messages=[*USER, message, {"role": "user", "content": "Again"}])
    assert client.post("/v1/chat/completions", json=history).status_code == 200


def test_a_body_is_json_whatever_its_content_type_on_every_method(lm, tmp_path):
    with make_server(lm, tmp_path) as live, httpx.Client(base_url=live.url, timeout=120) as http:
        # The README's first ops step, as curl -X PUT -d sends it.
        put = http.put("/v1/monitors/evil", content=b'{"mode": "annotate", "score": "z"}',
                       headers={"content-type": "application/x-www-form-urlencoded"})
        assert put.status_code == 200, put.text
        assert put.json()["mode"] == "annotate"
        plain = http.post("/v1/chat/completions", content=json.dumps(_body()).encode(), headers={"content-type": "text/plain"})
        assert plain.status_code == 200, plain.text
        bare = http.post("/tokenize", content=b'{"prompt": "Hi"}', headers={"content-type": ""})
        assert bare.status_code == 200 and bare.json()["count"] >= 1
        # A vector upload in its JSON form, sent the curl -d way, is read as JSON too.
        directions = [[0.0] * lm.hidden_size for _ in range(lm.num_layers + 1)]
        directions[19][0] = 1.0
        upload = http.put("/v1/vectors/curl-d", content=json.dumps({"directions": directions, "recommended_layer": 19}).encode(),
                          headers={"content-type": "application/x-www-form-urlencoded"})
        assert upload.status_code == 201, upload.text


def _json_operations(spec: dict) -> list[tuple[str, str]]:
    """(method, path) of every operation whose request body is JSON, path parameters filled in."""
    out = []
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if "application/json" in op.get("requestBody", {}).get("content", {}):
                out.append((method.upper(), re.sub(r"\{[^}]+\}", "optimistic", path)))
    return out


def test_every_validation_error_names_its_field(client):
    operations = _json_operations(client.get("/openapi.json").json())
    assert len(operations) >= 9, operations
    misses = []
    for method, path in operations:
        for content in (b"[]", b'"text"', b"{not json", b'{"no_such_field": 1}'):
            response = client.request(method, path, content=content, headers={"content-type": "application/json"})
            error = response.json().get("error", {}) if response.status_code >= 400 else {}
            if response.status_code != 400 or not error.get("param"):
                misses.append((method, path, content, response.status_code, error))
    assert not misses, misses
def test_seed_is_bounded_on_every_route_that_takes_one(client):
    for route, body in (("/v1/completions", {"model": "default", "prompt": "Hi", "max_tokens": 2}),
                        ("/v1/assess", {"repetitions": 2})):
        for bad in (2**64, -(2**63) - 1):
            response = client.post(route, json={**body, "seed": bad})
            assert response.status_code == 400, (route, bad, response.text)
            assert response.json()["error"]["param"] == "seed"


def test_the_whole_64_bit_seed_range_samples(client):
    """The edges of the accepted range reach the sampler; a negative seed is its unsigned twin."""
    def sample(seed: int) -> str:
        return answer(client, "Name a colour.", max_tokens=8, temperature=1.0, seed=seed)

    assert sample(2**64 - 1) == sample(-1)
    assert sample(-(2**63)) == sample(2**63)
