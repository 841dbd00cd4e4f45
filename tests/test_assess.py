"""Personality assessment: deterministic, shuffling cancels position bias, steering moves
the targeted axis."""

from __future__ import annotations

import asyncio

import pytest

from steering.assess import Inventory, assess, fleiss_kappa
from steering.steer import SteeringSpec, resolve_steering
from tests.conftest import REPO_VECTORS

MBTI = Inventory.load(REPO_VECTORS / "inventories" / "mbti.json")


def test_fleiss_kappa_known_values():
    assert fleiss_kappa([[3, 0], [0, 3], [3, 0]]) == pytest.approx(1.0)
    assert fleiss_kappa([[1, 1], [1, 1]]) == pytest.approx(-1.0)
    # Fleiss (1971)-style worked example, 3 subjects x 4 raters
    assert fleiss_kappa([[4, 0], [2, 2], [0, 4]]) == pytest.approx(0.5556, abs=1e-3)


def test_same_request_same_result(client):
    body = {"inventory": "mbti", "repetitions": 2, "seed": 7}
    a, b = client.post("/v1/assess", json=body), client.post("/v1/assess", json=body)
    assert a.status_code == 200, a.text
    assert a.json() == b.json()
    result = a.json()
    assert len(result["type"]) == 4
    for dim in ("E-I", "S-N", "T-F", "J-P"):
        d = result["dimensions"][dim]
        assert sum(d["share"].values()) == pytest.approx(1.0)
        assert [p["repetitions"] for p in d["kappa_curve"]] == [2]


def test_shuffling_turns_a_first_option_bias_into_fifty_percent(server):
    """A model that always answers label 1 scores near 50% per pole, not 100%, once options are shuffled."""
    result = asyncio.run(assess(server.state.engine, MBTI, repetitions=3, label_bias=[50.0, 0.0], seed=1))
    shares = [d["share"][dim.split("-")[0]] for dim, d in result["dimensions"].items()]
    assert all(0.25 <= s <= 0.75 for s in shares), shares
    assert 0.4 <= sum(shares) / len(shares) <= 0.6, shares
    # The bias is total, so every repetition agrees with itself only by chance of placement.
    assert all(d["kappa"] < 0.5 for d in result["dimensions"].values())


def test_big5_scores_are_on_the_scale(client):
    r = client.post("/v1/assess", json={"inventory": "big5", "repetitions": 2})
    assert r.status_code == 200, r.text
    for factor, f in r.json()["factors"].items():
        assert 1.0 <= f["score"] <= 5.0, factor


def test_steering_reaches_the_inventory_answers(server):
    """The assessment runs under the request's steering: the option probabilities change with
    it (on the 135M default model the answers are dominated by label position, so the shift is
    small and not monotonic for every axis; the README reports the measured matrix)."""
    registry = server.state.registry
    base = asyncio.run(assess(server.state.engine, MBTI, repetitions=2))
    steer = resolve_steering([SteeringSpec("mbti.E-I", 8.0)], registry)
    steered = asyncio.run(assess(server.state.engine, MBTI, repetitions=2, steering=steer))
    moved = [abs(steered["dimensions"][d]["mean_probability"][d[0]] - base["dimensions"][d]["mean_probability"][d[0]])
             for d in base["dimensions"]]
    assert max(moved) > 0.005, moved
    again = asyncio.run(assess(server.state.engine, MBTI, repetitions=2, steering=steer))
    assert again == steered


def test_compare_mode_reports_the_shift(client):
    r = client.post("/v1/assess", json={"inventory": "mbti", "repetitions": 2, "compare": True,
                                        "steering": {"mbti.E-I": 3.0}})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "assessment.comparison" and set(out["shift"]) == {"E-I", "S-N", "T-F", "J-P"}
    e = out["steered"]["dimensions"]["E-I"]["share"]["E"] - out["unsteered"]["dimensions"]["E-I"]["share"]["E"]
    assert out["shift"]["E-I"] == pytest.approx(e, abs=1e-3)
    assert client.post("/v1/assess", json={"compare": True}).status_code == 400
    # The same limits as generation: assessment goes through the same steering checks.
    too_strong = client.post("/v1/assess", json={"steering": {"optimistic": 1e6}})
    assert too_strong.status_code == 400 and too_strong.json()["error"]["param"] == "steering[0].coefficient"
    assert client.post("/v1/assess", json={"steering": {"nope": 1.0}}).status_code == 404
    assert client.post("/v1/assess", json={"repetitions": 1}).json()["error"]["param"] == "repetitions"
