"""Monitors end to end: scores, flag / block / annotate, persistence, calibration, caps,
response-phase stops, metrics, admin auth, and no extra forward pass."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import REPO_VECTORS, make_server

TRAIT = json.loads((REPO_VECTORS / "traits" / "optimistic.json").read_text())
QUESTION = TRAIT["heldout_questions"][0]
ADMIN = {"Authorization": "Bearer admin-secret"}
USER = {"Authorization": "Bearer user-secret"}


def _messages(system: str | None, question: str = QUESTION) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": question}]


@pytest.fixture(scope="module")
def live(lm, tmp_path_factory):
    with make_server(lm, tmp_path_factory.mktemp("monitored"), admin_keys=["admin-secret"], api_keys=["user-secret"]) as server:
        yield server


@pytest.fixture()
def c(live):
    with httpx.Client(base_url=live.url, timeout=120, headers=USER) as client:
        yield client
    # every test starts from no monitors
    with httpx.Client(base_url=live.url, timeout=30, headers=ADMIN) as admin:
        for m in admin.get("/v1/monitors").json()["data"]:
            admin.delete(f"/v1/monitors/{m['vector']}")


def put_monitor(live, vector: str, **fields) -> httpx.Response:
    return httpx.put(f"{live.url}/v1/monitors/{vector}", json=fields, headers=ADMIN, timeout=30)


def ask(c, system=None, question=QUESTION, **fields) -> httpx.Response:
    body = {"model": "default", "messages": _messages(system, question), "max_tokens": 8, "temperature": 0, **fields}
    return c.post("/v1/chat/completions", json=body)


def score(c, system=None, question=QUESTION) -> float:
    r = ask(c, system, question, monitor={"return_scores": True})
    assert r.status_code == 200, r.text
    return r.json()["persona_monitor"]["scores"]["optimistic"]["score"]


def test_trait_eliciting_system_prompt_scores_higher_than_neutral(live, c):
    assert put_monitor(live, "optimistic", mode="annotate").status_code == 200
    pos = [score(c, pair["pos"]) for pair in TRAIT["pairs"]]
    neg = [score(c, pair["neg"]) for pair in TRAIT["pairs"]]
    neutral = score(c, None)
    assert sum(pos) / len(pos) > neutral
    assert sum(pos) / len(pos) > sum(neg) / len(neg)


def test_enforce_blocks_before_generation_and_annotate_lets_through(live, c):
    high_prompt = TRAIT["pairs"][0]["pos"]
    put_monitor(live, "optimistic", mode="annotate")
    high, low = score(c, high_prompt), score(c, None)
    assert high > low
    cut = (high + low) / 2
    assert put_monitor(live, "optimistic", mode="enforce", flag_threshold=cut, block_threshold=cut).status_code == 200

    passes_before = live.state.engine.forward_passes
    blocked = ask(c, high_prompt)
    assert blocked.status_code == 400
    error = blocked.json()["error"]
    assert error["type"] == "content_filter" and error["code"] == "persona_blocked"
    assert error["persona_monitor"]["scores"]["optimistic"]["action"] == "block"
    assert "block_threshold" not in json.dumps(error)
    assert live.state.engine.forward_passes - passes_before == 1  # the prefill only: no token generated

    allowed = ask(c, None)
    assert allowed.status_code == 200 and "X-Persona-Flagged" not in allowed.headers
    assert "persona_monitor" not in allowed.json()  # not flagged, scores not asked for

    put_monitor(live, "optimistic", mode="annotate", flag_threshold=cut, block_threshold=cut)
    shadow = ask(c, high_prompt)
    assert shadow.status_code == 200
    assert shadow.headers["X-Persona-Flagged"] == "optimistic"
    reading = shadow.json()["persona_monitor"]["scores"]["optimistic"]
    assert reading["action"] == "block" and reading["mode"] == "annotate"
    assert shadow.json()["choices"][0]["message"]["content"]


def test_flag_is_reported_in_the_last_sse_chunk_and_header(live, c):
    high_prompt = TRAIT["pairs"][0]["pos"]
    put_monitor(live, "optimistic", mode="annotate")
    high, low = score(c, high_prompt), score(c, None)
    put_monitor(live, "optimistic", mode="enforce", flag_threshold=(high + low) / 2)
    body = {"model": "default", "messages": _messages(high_prompt), "max_tokens": 6, "stream": True}
    with c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["X-Persona-Flagged"] == "optimistic"
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "persona_monitor" in chunks[-1] and chunks[-1]["choices"][0]["finish_reason"]
    assert all("persona_monitor" not in ch for ch in chunks[:-1])


def test_monitors_persist_across_restart_with_an_audit_trail(lm, tmp_path):
    with make_server(lm, tmp_path) as first:
        r = put_monitor(first, "optimistic", mode="enforce", flag_threshold=1.5, block_threshold=3.0)
        assert r.status_code == 200
    with make_server(lm, tmp_path) as second:
        listed = httpx.get(f"{second.url}/v1/monitors").json()["data"]
        assert [(m["vector"], m["mode"], m["flag_threshold"], m["block_threshold"]) for m in listed] == [("optimistic", "enforce", 1.5, 3.0)]
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert audit[-1]["action"] == "put" and audit[-1]["new"]["block_threshold"] == 3.0
    assert audit[-1]["old"] is None and audit[-1]["who"].startswith("anonymous@")


def test_calibration_hits_the_target_flag_rate_on_its_own_set(live, c):
    r = httpx.post(f"{live.url}/v1/monitors/optimistic/calibrate", json={"target_flag_rate": 0.05, "target_block_rate": 0.01},
                   headers=ADMIN, timeout=300)
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["n_prompts"] >= 100 and result["source"] == "built-in neutral set"
    assert result["flag_rate"] == pytest.approx(0.05, abs=0.5 / result["n_prompts"])
    assert result["block_rate"] == pytest.approx(0.01, abs=0.5 / result["n_prompts"])
    p = result["percentiles"]
    assert p["p50"] <= p["p95"] <= p["p99"] <= p["max"]
    monitor = httpx.get(f"{live.url}/v1/monitors", headers=ADMIN).json()["data"][0]
    assert monitor["flag_threshold"] == pytest.approx(result["flag_threshold"], abs=1e-5)


def test_calibration_on_given_prompts(live):
    prompts = [f"Please list {n} fruits." for n in range(2, 42)]
    r = httpx.post(f"{live.url}/v1/monitors/optimistic/calibrate",
                   json={"prompts": prompts, "target_flag_rate": 0.1, "target_block_rate": 0.05, "apply": False}, headers=ADMIN, timeout=300)
    assert r.status_code == 200
    assert r.json()["n_prompts"] == 40 and r.json()["flag_rate"] == pytest.approx(0.1)
    assert httpx.get(f"{live.url}/v1/monitors", headers=ADMIN).json()["data"] == []  # apply=False


def test_steering_cap_refuses_with_403(live, c):
    assert put_monitor(live, "optimistic", mode="off", steering_max=0.0).status_code == 200
    over = ask(c, None, steering={"optimistic": 1.0})
    assert over.status_code == 403
    assert over.json()["error"]["param"] == "steering[0].coefficient"
    assert over.json()["error"]["code"] == "steering_not_allowed"
    assert ask(c, None, steering={"optimistic": -1.0}).status_code == 200
    vector = live.state.registry.get("optimistic")
    unit_over = ask(c, None, steering=[{"vector": "optimistic", "coefficient": 0.5, "unit": "unit"}])
    assert unit_over.status_code == 403 and float(vector.direction(vector.recommended_layer).norm()) > 0


def test_steering_caps_hold_for_the_request_as_a_whole(live, c):
    """A cap bounds what a (vector, layer, phase) receives in total, not each entry."""
    assert put_monitor(live, "optimistic", mode="off", steering_max=1.0, steering_min=-1.0).status_code == 200
    layer = live.state.registry.get("optimistic").recommended_layer
    four = ask(c, None, steering=[{"vector": "optimistic", "coefficient": 1.0}] * 4)
    assert four.status_code == 403, four.text
    assert four.json()["error"]["param"] == "steering[3].coefficient"
    assert four.json()["error"]["code"] == "steering_not_allowed"
    repeated = ask(c, None, steering=[{"vector": "optimistic", "coefficient": 1.0, "layers": [layer, layer, layer]}])
    assert repeated.status_code == 400 and repeated.json()["error"]["param"] == "steering[0].layers"
    below = ask(c, None, steering=[{"vector": "optimistic", "coefficient": -0.6}, {"vector": "optimistic", "coefficient": -0.6}])
    assert below.status_code == 403 and below.json()["error"]["param"] == "steering[1].coefficient"
    # Within the cap per (layer, phase): halves that meet it, other layers, other phases.
    for steering in (
        [{"vector": "optimistic", "coefficient": 0.5}] * 2,
        [{"vector": "optimistic", "coefficient": 1.0, "layers": [layer]},
         {"vector": "optimistic", "coefficient": 1.0, "layers": [layer + 1]}],
        [{"vector": "optimistic", "coefficient": 1.0, "positions": "prompt"},
         {"vector": "optimistic", "coefficient": 1.0, "positions": "response"}],
        [{"vector": "optimistic", "coefficient": 1.0}, {"vector": "optimistic", "coefficient": -1.0},
         {"vector": "optimistic", "coefficient": 1.0}],
    ):
        assert ask(c, None, steering=steering).status_code == 200, steering


def test_an_enforced_monitor_cannot_be_steered_around(live, c):
    """Prompt-phase steering below an enforced monitor's layer changes what it reads, so it is refused."""
    high_prompt = TRAIT["pairs"][0]["pos"]
    layer = live.state.registry.get("optimistic").recommended_layer
    evade = [{"vector": "optimistic", "coefficient": -4.0, "layers": [layer - 4]}]
    put_monitor(live, "optimistic", mode="annotate")
    high, low = score(c, high_prompt), score(c, None)
    steered = ask(c, high_prompt, steering=evade, monitor={"return_scores": True}).json()["persona_monitor"]["scores"]["optimistic"]
    assert steered["residual"] == "steered" and steered["score"] < high  # annotate keeps reading, labelled
    cut = (high + low) / 2
    assert put_monitor(live, "optimistic", mode="enforce", flag_threshold=cut, block_threshold=cut).status_code == 200

    assert ask(c, high_prompt).status_code == 400  # blocked unsteered
    for positions in ("all", "prompt"):
        for vector in ("optimistic", "evil"):  # any vector moves the residual the monitor reads
            refused = ask(c, high_prompt, steering=[{**evade[0], "vector": vector, "positions": positions}])
            assert refused.status_code == 403, (vector, positions, refused.text)
            error = refused.json()["error"]
            assert error["param"] == "steering[0].layers" and error["code"] == "steering_not_allowed"
            assert error["type"] == "permission_error"
    # A vector's shorthand steers at its recommended layer: one below optimistic's is refused.
    lower = next(v.name for v in live.state.registry.list() if v.recommended_layer < layer)
    shorthand = ask(c, None, steering={lower: 1.0})
    assert shorthand.status_code == 403 and shorthand.json()["error"]["param"] == "steering[0].layers"
    # Generated tokens only, or at the monitored layer and above: the reading is untouched.
    assert ask(c, None, steering=[{**evade[0], "positions": "response"}]).status_code == 200
    assert ask(c, None, steering=[{"vector": "optimistic", "coefficient": 1.0, "layers": [layer, layer + 2]}]).status_code == 200
    assert ask(c, high_prompt, steering=[{**evade[0], "positions": "response"}]).status_code == 400  # and still blocked


def test_response_phase_monitor_stops_generation(live, c):
    body = {"model": "default", "messages": _messages(None), "max_tokens": 40, "ignore_eos": True, "temperature": 0}
    free = c.post("/v1/chat/completions", json=body).json()
    assert free["usage"]["completion_tokens"] == 40
    put_monitor(live, "optimistic", mode="enforce", score="projection", response_threshold=-1e6, response_min_tokens=5)
    stopped = c.post("/v1/chat/completions", json=body).json()
    assert stopped["choices"][0]["finish_reason"] == "content_filter"
    assert stopped["usage"]["completion_tokens"] == 5
    assert stopped["persona_monitor"]["stopped_by"] == "optimistic"
    with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert chunks[-1]["choices"][0]["finish_reason"] == "content_filter"


def test_metrics_follow_a_known_sequence(live, c):
    high_prompt = TRAIT["pairs"][0]["pos"]
    put_monitor(live, "optimistic", mode="annotate")
    high, low = score(c, high_prompt), score(c, None)
    cut = (high + low) / 2
    put_monitor(live, "optimistic", mode="enforce", flag_threshold=cut - 1e-3, block_threshold=cut)

    def sample(text: str, name: str, **labels) -> float:
        for line in text.splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = c.get("/metrics").text
    for _ in range(3):
        assert ask(c, None).status_code == 200
    for _ in range(2):
        assert ask(c, high_prompt).status_code == 400
    after = c.get("/metrics").text
    for action, n in (("allow", 3), ("block", 2)):
        delta = sample(after, "persona_monitor_decisions_total", vector="optimistic", action=action, mode="enforce") - \
            sample(before, "persona_monitor_decisions_total", vector="optimistic", action=action, mode="enforce")
        assert delta == n
    assert sample(after, "persona_monitor_score_count", vector="optimistic") - sample(before, "persona_monitor_score_count", vector="optimistic") == 5
    assert "persona_monitor_threshold" not in after  # a client's scrape carries no thresholds
    ops = httpx.get(f"{live.url}/metrics", headers=ADMIN, timeout=30).text
    assert sample(ops, "persona_monitor_threshold", vector="optimistic", level="block") == pytest.approx(cut)
    assert sample(after, "persona_requests_total", endpoint="/v1/chat/completions", status="400") - \
        sample(before, "persona_requests_total", endpoint="/v1/chat/completions", status="400") == 2


def test_monitoring_adds_no_forward_pass(live, c):
    names = [v["id"] for v in c.get("/v1/vectors").json()["data"]][:4]
    body = {"max_tokens": 12, "ignore_eos": True}

    def passes_for_one_request() -> int:
        before = live.state.engine.forward_passes
        assert ask(c, None, **body).status_code == 200
        return live.state.engine.forward_passes - before

    without = passes_for_one_request()
    for name in names:
        put_monitor(live, name, mode="annotate", score="projection")
    with_monitors = passes_for_one_request()
    assert without == with_monitors == 12  # one prefill + 11 decode steps
    scored = ask(c, None, monitor={"return_scores": True}, **body).json()["persona_monitor"]["scores"]
    assert sorted(scored) == sorted(names)


def test_admin_routes_need_the_admin_key(live):
    url = f"{live.url}/v1/monitors/optimistic"
    assert httpx.put(url, json={"mode": "annotate"}).status_code == 401
    refused = httpx.put(url, json={"mode": "annotate"}, headers=USER)
    assert refused.status_code == 403 and "user-secret" not in refused.text
    wrong = httpx.put(url, json={"mode": "annotate"}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "nope" not in wrong.text
    assert httpx.get(f"{live.url}/v1/monitors", headers=USER).status_code == 403
    assert httpx.delete(f"{live.url}/v1/vectors/optimistic", headers=USER).status_code == 403
    assert httpx.post(f"{live.url}/v1/chat/completions", json={"model": "default", "messages": _messages(None)}).status_code == 401
    assert httpx.put(url, json={"mode": "annotate"}, headers=ADMIN).status_code == 200


@pytest.mark.parametrize("body,param", [
    ({"mode": "loud"}, "mode"),
    ({"flag_threshold": 3, "block_threshold": 1}, "block_threshold"),
    ({"layer": 99}, "layer"),
    ({"flag_threshold": "high"}, "flag_threshold"),
    ({"unknown": 1}, "unknown"),
])
def test_bad_monitor_config_is_refused(live, body, param):
    r = put_monitor(live, "optimistic", **body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param
    assert put_monitor(live, "no-such-vector", mode="annotate").status_code == 404


def _metric(text: str, name: str, **labels) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_score_sums_only_rise_and_give_the_mean_when_scores_are_negative(live, c):
    put_monitor(live, "optimistic", mode="annotate")
    series = ("persona_monitor_zscore_positive_total", "persona_monitor_zscore_negative_total", "persona_monitor_score_count")
    before = c.get("/metrics").text
    zs = []
    for system in [None] + [pair["neg"] for pair in TRAIT["pairs"]] + [TRAIT["pairs"][0]["pos"]]:
        r = ask(c, system, monitor={"return_scores": True}, max_tokens=1)
        zs.append(r.json()["persona_monitor"]["scores"]["optimistic"]["z"])
        now = c.get("/metrics").text
        for name in series:  # scrape after every request: no series ever falls
            assert _metric(now, name, vector="optimistic") >= _metric(before, name, vector="optimistic")
    after = c.get("/metrics").text
    assert any(z < 0 for z in zs) and any(z > 0 for z in zs), zs
    positive, negative, count = (_metric(after, n, vector="optimistic") - _metric(before, n, vector="optimistic") for n in series)
    assert count == len(zs)
    assert positive == pytest.approx(sum(z for z in zs if z > 0), abs=1e-6)
    assert negative == pytest.approx(-sum(z for z in zs if z < 0), abs=1e-6)
    assert (positive - negative) / count == pytest.approx(sum(zs) / len(zs), abs=1e-6)


def test_calibrated_flag_rate_holds_on_held_out_prompts(live, c):
    """Calibrate on one half of the neutral set, count flags on the other half through real chat
    requests. With 60 prompts on each side, the held-out rate's standard error (both halves'
    sampling) is about 0.07 at a 0.2 target; the stated tolerance is 0.15 (about 2 standard errors)."""
    prompts = json.loads((REPO_VECTORS / "neutral_prompts.json").read_text())["prompts"]
    target = 0.2
    rates = {}
    for name, fit, held_out in (("even", prompts[::2], prompts[1::2]), ("odd", prompts[1::2], prompts[::2])):
        put_monitor(live, "optimistic", mode="annotate")
        r = httpx.post(f"{live.url}/v1/monitors/optimistic/calibrate", headers=ADMIN, timeout=300,
                       json={"prompts": fit, "target_flag_rate": target, "target_block_rate": 0.05})
        assert r.status_code == 200, r.text
        assert r.json()["flag_rate"] == pytest.approx(target, abs=0.5 / len(fit))  # exact on its own prompts
        with ThreadPoolExecutor(16) as pool:  # concurrent, so the engine batches the prefills
            replies = list(pool.map(lambda prompt: ask(c, None, prompt, max_tokens=1), held_out))
        assert all(reply.status_code == 200 for reply in replies)
        rates[name] = sum(reply.headers.get("X-Persona-Flagged") == "optimistic" for reply in replies) / len(held_out)
    print(f"held-out flag rate at target {target}: fitted on even, measured on odd {rates['even']:.3f}; "
          f"fitted on odd, measured on even {rates['odd']:.3f}")
    for rate in rates.values():
        assert abs(rate - target) <= 0.15
