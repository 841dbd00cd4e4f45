"""The OpenAI wire contract, exercised with the official ``openai`` SDK against a real server."""

from __future__ import annotations

import httpx

from tests.conftest import chat


def test_models_list_names_the_loaded_model(oai, lm):
    ids = [m.id for m in oai.models.list().data]
    assert ids == [lm.name]


def test_chat_completion_returns_text_and_consistent_usage(oai, lm):
    out = oai.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=20,
    )
    choice = out.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert 0 < out.usage.completion_tokens <= 20
    assert out.model == lm.name


def test_streamed_chat_joins_to_the_non_streamed_greedy_answer(oai):
    messages = [{"role": "user", "content": "Describe your morning."}]
    whole = oai.chat.completions.create(model="default", messages=messages, temperature=0, max_tokens=40)
    stream = oai.chat.completions.create(
        model="default", messages=messages, temperature=0, max_tokens=40, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_streaming_ends_with_done_marker(client):
    with client.stream("POST", "/v1/chat/completions", json={
        "model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "stream": True,
    }) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_text_completion_and_its_stream_agree(oai):
    whole = oai.completions.create(model="default", prompt="The three primary colors are", temperature=0, max_tokens=16)
    streamed = "".join(
        c.choices[0].text for c in oai.completions.create(
            model="default", prompt="The three primary colors are", temperature=0, max_tokens=16, stream=True,
        )
    )
    assert whole.object == "text_completion"
    assert whole.choices[0].text and streamed == whole.choices[0].text
    assert whole.usage.completion_tokens == 16 or whole.choices[0].finish_reason == "stop"


def test_greedy_is_deterministic_and_max_tokens_is_respected(client):
    first = chat(client, "Tell me about the sea.", max_tokens=12).json()
    second = chat(client, "Tell me about the sea.", max_tokens=12).json()
    assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]
    assert first["usage"]["completion_tokens"] == 12
    assert first["choices"][0]["finish_reason"] == "length"


def test_stop_string_ends_the_answer_before_it(client):
    text = chat(client, "Describe your morning.", max_tokens=30).json()["choices"][0]["message"]["content"]
    stop = " " + text.split()[4]  # a word from the middle of the free answer
    stopped = chat(client, "Describe your morning.", max_tokens=30, stop=[stop]).json()
    assert stopped["choices"][0]["message"]["content"] == text[: text.index(stop)]
    assert stopped["choices"][0]["finish_reason"] == "stop"


def test_seeded_sampling_is_reproducible(client):
    fields = {"temperature": 1.0, "top_p": 0.9, "seed": 1234, "max_tokens": 20}
    a = chat(client, "Invent a name for a cat.", **fields).json()["choices"][0]["message"]["content"]
    b = chat(client, "Invent a name for a cat.", **fields).json()["choices"][0]["message"]["content"]
    assert a == b


def test_curl_style_body_without_json_content_type_is_accepted(server):
    body = b'{"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}'
    response = httpx.post(f"{server.url}/v1/chat/completions", content=body,
                          headers={"content-type": "application/x-www-form-urlencoded"}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1


def test_health_ready_and_metrics_move(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").status_code == 200

    def counter(text: str, name: str) -> float:
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                if line.startswith(name + " ") or 'endpoint="/v1/chat/completions",status="200"' in line:
                    return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = client.get("/metrics").text
    usage = chat(client, "Hello", max_tokens=7).json()["usage"]
    after = client.get("/metrics").text
    assert counter(after, "persona_requests_total") - counter(before, "persona_requests_total") == 1
    assert counter(after, "persona_generation_tokens_total") - counter(before, "persona_generation_tokens_total") == usage["completion_tokens"]
    assert counter(after, "persona_prompt_tokens_total") - counter(before, "persona_prompt_tokens_total") == usage["prompt_tokens"]
    assert "persona_time_to_first_token_seconds_bucket" in after
    assert 'persona_model_info{' in after
