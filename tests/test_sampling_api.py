"""OpenAI and vLLM sampling fields, per row inside the continuous batch: logprobs, n,
penalties, logit_bias, top_k, min_p, stop_token_ids; and tiny temperatures beside greedy rows."""

from __future__ import annotations

import concurrent.futures
import json
import math

from tests.conftest import chat

CHAT = "/v1/chat/completions"


def _body(content: str, **fields) -> dict:
    return {"model": "default", "messages": [{"role": "user", "content": content}], "max_tokens": 8, **fields}


def test_chat_logprobs_report_the_chosen_token_and_its_alternatives(client):
    reply = chat(client, "What is the capital of France?", logprobs=True, top_logprobs=3, max_tokens=6).json()
    content = reply["choices"][0]["logprobs"]["content"]
    assert len(content) == reply["usage"]["completion_tokens"]
    for entry in content:
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 3
        # Greedy: the chosen token is the most likely one.
        assert entry["token"] == entry["top_logprobs"][0]["token"]
        assert math.isclose(entry["logprob"], entry["top_logprobs"][0]["logprob"], abs_tol=1e-4)
        assert bytes(entry["bytes"]).decode("utf-8") == entry["token"]
    text = reply["choices"][0]["message"]["content"]
    assert "".join(e["token"] for e in content).startswith(text[:5])


def test_top_logprobs_without_logprobs_is_refused_naming_the_field(client):
    response = chat(client, "Hi", top_logprobs=2)
    assert response.status_code == 400 and response.json()["error"]["param"] == "top_logprobs"


def test_completion_logprobs_are_parallel_lists(client):
    reply = client.post("/v1/completions", json={"model": "default", "prompt": "The sky is", "max_tokens": 5,
                                                 "temperature": 0, "logprobs": 2}).json()
    lp = reply["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 5
    assert all(len(top) <= 2 for top in lp["top_logprobs"]) and lp["text_offset"][0] == 0


def test_n_choices_are_reproducible_with_a_seed_and_stream_with_their_index(client):
    body = _body("Write a word.", n=3, temperature=1.0, seed=11, max_tokens=10)
    first = client.post(CHAT, json=body).json()
    again = client.post(CHAT, json=body).json()
    texts = [c["message"]["content"] for c in first["choices"]]
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    assert texts == [c["message"]["content"] for c in again["choices"]]
    assert len(set(texts)) > 1  # each choice draws its own tokens
    with client.stream("POST", CHAT, json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    streamed = {0: "", 1: "", 2: ""}
    for chunk in chunks:
        for choice in chunk["choices"]:
            streamed[choice["index"]] += choice["delta"].get("content") or ""
    assert [streamed[i] for i in range(3)] == texts
    assert chunks[-1]["usage"]["completion_tokens"] == first["usage"]["completion_tokens"]


def test_logit_bias_forces_a_token_and_stop_token_ids_end_on_it(client, lm):
    token = lm.tokenizer(" banana", add_special_tokens=False).input_ids[0]
    forced = chat(client, "Say something.", logit_bias={str(token): 100}, max_tokens=4).json()
    assert forced["choices"][0]["message"]["content"].count("banana") == 4
    stopped = chat(client, "Say something.", logit_bias={str(token): 100}, stop_token_ids=[token], max_tokens=4).json()
    assert stopped["choices"][0]["finish_reason"] == "stop" and stopped["usage"]["completion_tokens"] == 1
    assert "banana" not in stopped["choices"][0]["message"]["content"]
    bad = chat(client, "Hi", logit_bias={"999999999": 5})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "logit_bias"


def test_top_k_one_and_min_p_one_sample_the_greedy_token(client):
    greedy = chat(client, "Describe your morning.", max_tokens=12).json()["choices"][0]["message"]["content"]
    for fields in ({"top_k": 1}, {"min_p": 1.0}):
        sampled = chat(client, "Describe your morning.", max_tokens=12, temperature=1.0, seed=5, **fields).json()
        assert sampled["choices"][0]["message"]["content"] == greedy


def test_penalties_reduce_repetition(client):
    prompt = "Repeat the word 'cat' many times."
    plain = chat(client, prompt, max_tokens=30, ignore_eos=True).json()["choices"][0]["logprobs"]
    assert plain is None
    base = chat(client, prompt, max_tokens=30, ignore_eos=True, logprobs=True).json()
    ids_base = [e["token"] for e in base["choices"][0]["logprobs"]["content"]]
    for fields in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"repetition_penalty": 2.0}):
        penalized = chat(client, prompt, max_tokens=30, ignore_eos=True, logprobs=True, **fields).json()
        ids = [e["token"] for e in penalized["choices"][0]["logprobs"]["content"]]
        assert len(set(ids)) > len(set(ids_base)), fields


def test_a_tiny_temperature_among_greedy_requests_fails_nobody(client):
    bodies = [_body("Tell me about rivers.", temperature=0)] * 4 + [_body("Tell me about rivers.", temperature=1e-38)]
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        replies = list(pool.map(lambda b: client.post(CHAT, json=b), bodies))
    assert [r.status_code for r in replies] == [200] * 5
    texts = {r.json()["choices"][0]["message"]["content"] for r in replies}
    assert len(texts) == 1  # below 1e-5 a temperature is greedy
