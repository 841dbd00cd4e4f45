"""Personality assessment: deterministic, shuffling cancels position bias, steering moves
the targeted axis."""

from __future__ import annotations

import asyncio

import pytest

from app.settings import REPO_VECTORS
from steering.assess import Inventory, assess, fleiss_kappa
from steering.steer import SteeringSpec, resolve_steering

MBTI = Inventory.load(REPO_VECTORS / "inventories" / "mbti.json")


def test_fleiss_kappa_known_values():
    assert fleiss_kappa([[3, 0], [0, 3], [3, 0]]) == pytest.approx(1.0)
    assert fleiss_kappa([[1, 1], [1, 1]]) == pytest.approx(-1.0)
    # Fleiss (1971)-style worked example, 3 subjects x 4 raters
    assert fleiss_kappa([[4, 0], [2, 2], [0, 4]]) == pytest.approx(0.5556, abs=1e-3)


def test_same_request_same_result(client):
    body = {"inventory": "mbti", "repetitions": 3, "seed": 7}
    a, b = client.post("/v1/assess", json=body), client.post("/v1/assess", json=body)
    assert a.status_code == 200, a.text
    assert a.json() == b.json()
    result = a.json()
    assert len(result["type"]) == 4
    for dim in ("E-I", "S-N", "T-F", "J-P"):
        d = result["dimensions"][dim]
        assert sum(d["share"].values()) == pytest.approx(1.0)
        assert [p["repetitions"] for p in d["kappa_curve"]] == [2, 3]


def test_shuffling_turns_a_first_option_bias_into_fifty_percent(server):
    result = asyncio.run(assess(server.state.engine, MBTI, repetitions=10, label_bias=[50.0, 0.0], seed=1))
    for dim, d in result["dimensions"].items():
        first = dim.split("-")[0]
        assert 0.35 <= d["share"][first] <= 0.65, (dim, d["share"])


def test_big5_scores_are_on_the_scale(client):
    r = client.post("/v1/assess", json={"inventory": "big5", "repetitions": 2})
    assert r.status_code == 200, r.text
    for factor, f in r.json()["factors"].items():
        assert 1.0 <= f["score"] <= 5.0, factor


def test_steering_each_mbti_axis_moves_its_pole_share(server):
    registry = server.state.registry
    matrix = {}
    for axis in ("E-I", "S-N", "T-F", "J-P"):
        name = f"mbti.{axis}"
        c = 2 * registry.get(name).coefficient_range[0]
        shares = []
        for coefficient in (-c, 0.0, c):
            steer = resolve_steering([SteeringSpec(name, coefficient)], registry) if coefficient else None
            result = asyncio.run(assess(server.state.engine, MBTI, repetitions=2, steering=steer))
            shares.append({d: v["mean_probability"][d.split("-")[0]] for d, v in result["dimensions"].items()})
        matrix[axis] = {d: round(shares[2][d] - shares[0][d], 3) for d in shares[0]}
        assert shares[0][axis] < shares[1][axis] < shares[2][axis], (axis, shares)
    print("shift of first-pole probability (+c minus -c), rows = steered axis:", matrix)


def test_compare_mode_reports_the_shift(client):
    r = client.post("/v1/assess", json={"inventory": "mbti", "repetitions": 2, "compare": True,
                                        "steering": {"mbti.E-I": 3.0}})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "assessment.comparison" and set(out["shift"]) == {"E-I", "S-N", "T-F", "J-P"}
    e = out["steered"]["dimensions"]["E-I"]["share"]["E"] - out["unsteered"]["dimensions"]["E-I"]["share"]["E"]
    assert out["shift"]["E-I"] == pytest.approx(e, abs=1e-3)
    assert client.post("/v1/assess", json={"compare": True}).status_code == 400
    assert client.post("/v1/assess", json={"repetitions": 1}).json()["error"]["param"] == "repetitions"
