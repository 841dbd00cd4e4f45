"""Property-based fuzzing of every endpoint from the server's own OpenAPI schema: never a 5xx,
and every refusal in the OpenAI error envelope."""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.conftest import make_server

MAX_EXAMPLES = int(os.environ.get("PERSONA_FUZZ_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def fuzz_server(lm, tmp_path_factory):
    # Small limits keep each generated request cheap; the admin key keeps fuzzed writes out.
    with make_server(lm, tmp_path_factory.mktemp("fuzz"), default_max_tokens=2, max_tokens_limit=4, max_assess_prompts=256,
                     admin_keys=["fuzz-admin"]) as live:
        yield live


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_always_the_envelope(case, fuzz_server):
    response = case.call(base_url=fuzz_server.url, timeout=60)
    assert response.status_code < 500, (case.method, case.path, response.text[:500])
    if response.status_code >= 400:
        body = response.json()
        assert set(body["error"]) >= {"message", "type", "param", "code"}, body
