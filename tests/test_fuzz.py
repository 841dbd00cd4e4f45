"""Property-based fuzzing of every endpoint from the server's own OpenAPI schema: never a 5xx,
and every refusal in the OpenAI error envelope."""

from __future__ import annotations

import json
import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.conftest import make_server

MAX_EXAMPLES = int(os.environ.get("PERSONA_FUZZ_EXAMPLES", "25"))


@schemathesis.serializer("application/x-ndjson")
def _jsonl(_ctx, value) -> bytes:
    """The screening upload is JSONL: send whatever was generated as lines of JSON."""
    items = value if isinstance(value, list) else [value]
    return "".join(json.dumps(item) + "\n" for item in items).encode()


@pytest.fixture(scope="module")
def fuzz_server(lm, tmp_path_factory):
    # Small limits keep each generated request cheap; the admin key keeps fuzzed writes out.
    with make_server(lm, tmp_path_factory.mktemp("fuzz"), default_max_tokens=2, max_tokens_limit=4,
                     max_assess_prompts=256, max_prompt_tokens=256, admin_keys=["fuzz-admin"]) as live:
        yield live


def test_every_operation_survives_generated_input(fuzz_server):
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    seen: dict[str, set[int]] = {}

    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            # Half the cases carry the admin key, so admin routes are fuzzed past their 401.
            headers = {"Authorization": "Bearer fuzz-admin"} if hash(repr(case.body)) % 2 else {}
            response = case.call(base_url=fuzz_server.url, timeout=120, headers=headers)
            seen.setdefault(operation.label, set()).add(response.status_code)
            assert response.status_code < 500, (case.method, case.path, response.text[:500])
            if response.status_code >= 400:
                body = response.json()
                assert set(body["error"]) >= {"message", "type", "param", "code"}, body

        check()
    print("status codes per operation:", {k: sorted(v) for k, v in seen.items()})
    assert len(seen) == len(operations)
