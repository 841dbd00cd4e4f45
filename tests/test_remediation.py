"""Remediation: a monitor that steers a flagged request's answer back instead of blocking it.

Each test starts a real server on the shared model and asks it as a client would; the
reference for a remediated answer is the same request carrying the remediation as its own
response-phase steering, on a server with no monitor. The vLLM engine's remediation is in
tests/test_engine_contract.py (run on both engines).
"""

from __future__ import annotations

import json

import httpx
import pytest

from steering.monitor import MonitorSet
from tests.conftest import REPO_VECTORS, make_server

ADMIN = {"Authorization": "Bearer admin-secret"}
TRAIT = json.loads((REPO_VECTORS / "traits" / "optimistic.json").read_text())
ELICITING = TRAIT["pairs"][0]["pos"]
QUESTION = TRAIT["heldout_questions"][0]
# Strong enough to change a 135M model's greedy answer within a few tokens.
REMEDY = [{"vector": "optimistic", "coefficient": -8.0}]


@pytest.fixture(scope="module")
def live(lm, tmp_path_factory):
    with make_server(lm, tmp_path_factory.mktemp("remediation"), admin_keys=["admin-secret"],
                     max_abs_coefficient=10.0) as server:
        yield server


@pytest.fixture()
def c(live):
    with httpx.Client(base_url=live.url, timeout=120, headers=ADMIN) as client:
        yield client
        for m in client.get("/v1/monitors").json()["data"]:
            client.delete(f"/v1/monitors/{m['vector']}")


def ask(c, max_tokens: int = 12, **fields) -> httpx.Response:
    body = {"model": "default", "messages": [{"role": "system", "content": ELICITING}, {"role": "user", "content": QUESTION}],
            "max_tokens": max_tokens, "temperature": 0, "monitor": {"return_scores": True}, **fields}
    return c.post("/v1/chat/completions", json=body)


def text(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def eliciting_z(c) -> float:
    assert c.put("/v1/monitors/optimistic", json={"mode": "annotate"}).status_code == 200
    z = ask(c, max_tokens=1).json()["persona_monitor"]["scores"]["optimistic"]["z"]
    c.delete("/v1/monitors/optimistic")
    return z


def decisions(c, action: str, mode: str) -> float:
    for line in c.get("/metrics").text.splitlines():
        if (line.startswith("persona_monitor_decisions_total{") and 'vector="optimistic"' in line
                and f'action="{action}"' in line and f'mode="{mode}"' in line):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_request_above_the_threshold_is_served_remediated_from_its_second_token(c):
    z = eliciting_z(c)
    plain, first_plain = text(ask(c)), text(ask(c, max_tokens=1))
    own = text(ask(c, steering=[{**REMEDY[0], "positions": "response"}]))
    # steering_min 0 forbids clients negative steering on the vector; the remediation is the server's.
    put = c.put("/v1/monitors/optimistic", json={"mode": "enforce", "remediation": REMEDY, "remediate_threshold": z - 1,
                                                 "block_threshold": z + 5, "steering_min": 0.0})
    assert put.status_code == 200, put.text
    before = decisions(c, "remediate", "enforce")
    response = ask(c)
    remediated = text(response)
    body = response.json()["persona_monitor"]
    assert body["scores"]["optimistic"]["action"] == "remediate" and body["remediated"] == ["optimistic"]
    assert response.headers["X-Persona-Flagged"] == "optimistic"
    assert decisions(c, "remediate", "enforce") == before + 1
    assert remediated != plain
    # Exactly what the same steering on generated tokens gives: the first token, sampled from the
    # prefill's logits, is not steered by it; every later one is.
    assert remediated == own
    assert text(ask(c, max_tokens=1)) == first_plain
    # It composes with the request's own response steering (allowed by the caps): the deltas add up.
    both = text(ask(c, steering=[{"vector": "optimistic", "coefficient": 3.0, "positions": "response"}]))
    c.delete("/v1/monitors/optimistic")
    reference = text(ask(c, steering=[{"vector": "optimistic", "coefficient": 3.0, "positions": "response"},
                                      {**REMEDY[0], "positions": "response"}]))
    assert both == reference


def test_below_the_threshold_the_answer_is_token_identical_and_annotate_only_reports(c):
    z = eliciting_z(c)
    plain = ask(c, logprobs=True).json()["choices"][0]
    assert c.put("/v1/monitors/optimistic", json={"mode": "enforce", "remediation": REMEDY,
                                                  "remediate_threshold": z + 1}).status_code == 200
    below = ask(c, logprobs=True)
    assert below.json()["persona_monitor"]["scores"]["optimistic"]["action"] == "allow"
    assert [t["token"] for t in below.json()["choices"][0]["logprobs"]["content"]] == \
        [t["token"] for t in plain["logprobs"]["content"]]

    assert c.put("/v1/monitors/optimistic", json={"mode": "annotate", "remediation": REMEDY,
                                                  "remediate_threshold": z - 1}).status_code == 200
    before = decisions(c, "remediate", "annotate")
    annotated = ask(c)
    reading = annotated.json()["persona_monitor"]
    assert reading["scores"]["optimistic"]["action"] == "remediate" and reading["scores"]["optimistic"]["mode"] == "annotate"
    assert "remediated" not in reading
    assert text(annotated) == plain["message"]["content"]
    assert decisions(c, "remediate", "annotate") == before + 1


def test_block_wins_above_the_block_threshold(c):
    z = eliciting_z(c)
    assert c.put("/v1/monitors/optimistic", json={"mode": "enforce", "remediation": REMEDY, "remediate_threshold": z - 2,
                                                  "block_threshold": z - 1}).status_code == 200
    blocked = ask(c)
    assert blocked.status_code == 400 and blocked.json()["error"]["code"] == "persona_blocked"
    assert blocked.json()["error"]["persona_monitor"]["scores"]["optimistic"]["action"] == "block"


@pytest.mark.parametrize("fields, param", [
    ({"remediation": REMEDY}, "remediate_threshold"),
    ({"remediate_threshold": 1.0}, "remediation"),
    ({"remediation": REMEDY, "remediate_threshold": 3.0, "block_threshold": 2.0}, "remediate_threshold"),
    ({"remediation": [{"vector": "optimistic", "coefficient": -1, "positions": "all"}], "remediate_threshold": 1.0},
     "remediation[0].positions"),
    ({"remediation": [{"vector": "no-such-vector", "coefficient": -1}], "remediate_threshold": 1.0}, "remediation[0].vector"),
    ({"remediation": [{"vector": "optimistic", "coefficient": -1, "layers": [999]}], "remediate_threshold": 1.0},
     "remediation[0].layers"),
    ({"remediation": [{"vector": "optimistic", "coefficient": -6}, {"vector": "optimistic", "coefficient": -6}],
      "remediate_threshold": 1.0}, "remediation[1].coefficient"),
])
def test_a_bad_remediation_is_refused_naming_the_field(c, fields, param):
    response = c.put("/v1/monitors/optimistic", json={"mode": "enforce", **fields})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert c.get("/v1/monitors/optimistic").status_code == 404


def test_a_vector_that_a_remediation_steers_with_cannot_be_deleted(c, live):
    assert c.put("/v1/monitors/optimistic", json={"mode": "enforce", "remediate_threshold": 1.0,
                                                  "remediation": [{"vector": "evil", "coefficient": -1}]}).status_code == 200
    refused = c.delete("/v1/vectors/evil")
    assert refused.status_code == 409 and "remediation" in refused.json()["error"]["message"]
    assert isinstance(live.state.monitors, MonitorSet) and "optimistic" in live.state.monitors.configs()
