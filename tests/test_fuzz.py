"""Property-based fuzzing of every endpoint from the server's own OpenAPI schema: never a 5xx,
and every refusal in the OpenAI error envelope. The run is seeded, so it is the same run every
time."""

from __future__ import annotations

import json
import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from tests.conftest import make_server

MAX_EXAMPLES = int(os.environ.get("PERSONA_FUZZ_EXAMPLES", "25"))
SEED = int(os.environ.get("PERSONA_FUZZ_SEED", "20261124"))
GENERATION = ("POST /v1/chat/completions", "POST /v1/completions")


@schemathesis.serializer("application/x-ndjson")
def _jsonl(_ctx, value) -> bytes:
    """The screening upload is JSONL: send whatever was generated as lines of JSON."""
    items = value if isinstance(value, list) else [value]
    return "".join(json.dumps(item) + "\n" for item in items).encode()


@pytest.fixture(scope="module")
def fuzz_server(lm, tmp_path_factory):
    # Small limits keep each generated request cheap (the smallest assessment needs 100 prompts, so
    # assessments stop at their budget check; tests/test_assess.py runs them); the admin key keeps
    # fuzzed writes out.
    with make_server(lm, tmp_path_factory.mktemp("fuzz"), default_max_tokens=2, max_tokens_limit=4,
                     max_assess_prompts=64, max_prompt_tokens=128, admin_keys=["fuzz-admin"]) as live:
        yield live


def servable(model: str, vectors: list[str], num_layers: int, vocab: int) -> st.SearchStrategy[dict]:
    """The fields a generated request would almost never get right by chance (the served model,
    existing vectors and steerable layers, token ids inside the vocabulary, a non-empty prompt, a
    short answer, one or two choices); the schema's generator fills in the rest. Without them every generated
    generation request stops at 404 on ``model`` or at 400 on a token id."""
    coefficient = st.floats(-3.0, 3.0)
    token = st.integers(0, vocab - 1)
    entry = st.fixed_dictionaries(
        {"vector": st.sampled_from(vectors), "coefficient": coefficient},
        optional={"layers": st.lists(st.integers(1, num_layers), min_size=1, max_size=3, unique=True),
                  "positions": st.sampled_from(["all", "prompt", "response"]),
                  "unit": st.sampled_from(["raw", "unit", "residual"])},
    )
    steering = st.none() | st.dictionaries(st.sampled_from(vectors), coefficient, max_size=3) | st.lists(entry, max_size=4)
    return st.fixed_dictionaries({
        "model": st.sampled_from([model, "default"]),
        "max_tokens": st.integers(1, 4),
        "n": st.integers(1, 2),
        "min_tokens": st.just(0),
        "steering": steering,
        "stop_token_ids": st.none() | st.lists(token, max_size=4),
        "logit_bias": st.none() | st.dictionaries(token.map(str), st.floats(-100.0, 100.0), max_size=4),
    })


def prompts(vocab: int) -> st.SearchStrategy:
    return st.text(min_size=1, max_size=64) | st.lists(st.integers(0, vocab - 1), min_size=1, max_size=16)


def conversations() -> st.SearchStrategy:
    """A well-formed conversation: generated message lists almost always break a chat-template rule
    (a role in the wrong place, an empty turn) and stop at 400 before the engine."""
    text = st.text(min_size=1, max_size=48)
    turn = st.fixed_dictionaries({"role": st.just("user"), "content": text})
    system = st.fixed_dictionaries({"role": st.just("system"), "content": text})
    return st.tuples(st.lists(system, max_size=1), turn).map(lambda parts: [*parts[0], parts[1]])


def test_every_operation_survives_generated_input(fuzz_server):
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    vectors = [v["id"] for v in httpx.get(f"{fuzz_server.url}/v1/vectors").json()["data"]]
    lm = fuzz_server.state.lm
    vocab = len(lm.tokenizer)
    fields = servable(lm.name, vectors, lm.num_layers, vocab)
    seen: dict[str, list[int]] = {}

    def run(operation, servable_fields: bool) -> None:
        @seed(SEED)
        @given(case=operation.as_strategy(), data=st.data())
        @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case, data):
            # Half the cases carry the admin key, so admin routes are fuzzed past their 401. The
            # generation routes get a second run whose requests name what this server serves, so
            # they reach the engine and not only the validators.
            headers = {"Authorization": "Bearer fuzz-admin"} if data.draw(st.booleans(), "admin") else {}
            if servable_fields and isinstance(case.body, dict):
                case.body = {**case.body, **data.draw(fields, "servable fields")}
                if "prompt" in case.body:
                    case.body["prompt"] = data.draw(prompts(vocab), "prompt")
                if "messages" in case.body:
                    case.body["messages"] = data.draw(conversations(), "messages")
            response = case.call(base_url=fuzz_server.url, timeout=120, headers=headers)
            label = operation.label + (" (servable)" if servable_fields else "")
            seen.setdefault(label, []).append(response.status_code)
            if os.environ.get("PERSONA_FUZZ_DEBUG") and response.status_code >= 400:
                print(label, response.status_code, response.text[:300])
            assert response.status_code < 500, (case.method, case.path, response.text[:500])
            if response.status_code >= 400:
                body = response.json()
                assert set(body["error"]) >= {"message", "type", "param", "code"}, body

        check()

    for operation in operations:
        run(operation, servable_fields=False)
        if operation.label in GENERATION:
            run(operation, servable_fields=True)
    print("status codes per operation:", {k: {c: v.count(c) for c in sorted(set(v))} for k, v in seen.items()})
    assert len(seen) == len(operations) + len(GENERATION)
    for label in GENERATION:  # generated requests reach the engine, not only the validators
        assert seen[label + " (servable)"].count(200) >= 3, (label, seen[label + " (servable)"])
