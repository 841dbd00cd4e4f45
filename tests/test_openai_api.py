"""The OpenAI wire contract, exercised with the official ``openai`` SDK against a real server."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import httpx
import pytest

from app.sampling_defaults import EMBEDDED_RECOMMENDED, read_generation_config, resolve_sampling_defaults
from app.settings import Settings
from tests.conftest import chat, make_server


def test_models_list_names_the_loaded_model_and_its_alias(oai, client, lm, server):
    ids = [m.id for m in oai.models.list().data]
    assert ids == [lm.name, "default"]
    for card in client.get("/v1/models").json()["data"]:
        assert card["root"] == lm.name
        assert card["max_model_len"] == server.state.engine.max_model_len <= lm.context_length
    assert oai.models.retrieve("default").id == "default"
    missing = client.get("/v1/models/gpt-9")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"


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


def test_stop_string_ending_in_a_character_of_several_tokens_ends_the_answer(client, lm):
    # The model copies the pattern; fullwidth "！" is two byte-level tokens of its vocabulary.
    body = {"model": "default", "prompt": "Hi！Yo " * 6 + "Hi！", "temperature": 0, "max_tokens": 12}
    assert len(lm.tokenizer("！", add_special_tokens=False).input_ids) == 2
    free = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert free.find("！") > 0  # some text, then the stop
    for stream in (False, True):
        r = client.post("/v1/completions", json={**body, "stop": ["！"], "stream": stream})
        if stream:
            events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
            text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
            finish = [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1]
        else:
            text, finish = r.json()["choices"][0]["text"], r.json()["choices"][0]["finish_reason"]
        assert (text, finish) == (free[: free.index("！")], "stop")


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
                if 'endpoint="/v1/chat/completions",status="200"' in line or 'adapter=""' in line:
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


def _sse_data(response: httpx.Response) -> list:
    return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]


def test_stream_usage_arrives_on_the_last_chunk_only_when_asked(client):
    body = {"model": "default", "prompt": "The three primary colors are", "temperature": 0, "max_tokens": 9, "stream": True}
    with client.stream("POST", "/v1/completions", json={**body, "stream_options": {"include_usage": True}}) as response:
        chunks = _sse_data(response)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 9
    assert chunks[-1]["usage"]["total_tokens"] == chunks[-1]["usage"]["prompt_tokens"] + 9
    assert all("usage" not in c for c in chunks[:-1])
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert all("usage" not in c for c in _sse_data(response))


def test_response_id_carries_the_request_id_of_the_access_log(client, caplog):
    caplog.set_level(logging.INFO, logger="persona_server.access")
    given = chat(client, "Hi", max_tokens=3).json()
    response = client.post("/v1/chat/completions", headers={"X-Request-Id": "trace-42.a"}, json={
        "model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
    assert response.json()["id"] == "chatcmpl-trace-42.a"
    with client.stream("POST", "/v1/completions", headers={"X-Request-Id": "trace-43"}, json={
            "model": "default", "prompt": "Hi", "max_tokens": 3, "stream": True}) as streamed:
        assert {c["id"] for c in _sse_data(streamed)} == {"cmpl-trace-43"}

    def logged_ids() -> set[str]:
        return {json.loads(r.getMessage())["request_id"] for r in caplog.records if r.name == "persona_server.access"}

    # The line is written once the response is sent, which the client may see first.
    deadline = time.monotonic() + 10
    while not {"trace-42.a", "trace-43"} <= logged_ids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert {"trace-42.a", "trace-43"} <= logged_ids()
    # Without a header the server's own id is used, and it is the one echoed and logged.
    assert given["id"].removeprefix("chatcmpl-") in logged_ids()


def test_tokenize_counts_what_the_chat_route_counts(client, server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    tokens = client.post("/tokenize", json={"model": "default", "messages": messages, "return_token_strs": True}).json()
    usage = client.post("/v1/chat/completions", json={"model": "default", "messages": messages, "max_tokens": 1}).json()["usage"]
    assert tokens["count"] == len(tokens["tokens"]) == usage["prompt_tokens"]
    assert tokens["max_model_len"] == server.state.engine.max_model_len
    assert len(tokens["token_strs"]) == tokens["count"]
    without = client.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert without["count"] < tokens["count"] and tokens["tokens"][: without["count"]] == without["tokens"]


def test_tokenize_and_detokenize_round_trip_a_prompt(client):
    text = "Persona vectors steer a model's personality."
    tokens = client.post("/tokenize", json={"prompt": text}).json()
    assert tokens["token_strs"] is None
    usage = client.post("/v1/completions", json={"model": "default", "prompt": text, "max_tokens": 1}).json()["usage"]
    assert tokens["count"] == usage["prompt_tokens"]
    assert client.post("/detokenize", json={"model": "default", "tokens": tokens["tokens"]}).json() == {"prompt": text}


@pytest.mark.parametrize("path,body,param", [
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),
    ("/tokenize", {"prompt": "a", "continue_final_message": True}, "continue_final_message"),
    ("/tokenize", {"messages": [{"role": "robot", "content": "b"}]}, "messages[0].role"),
    ("/detokenize", {"tokens": [1, 10**9]}, "tokens[1]"),
    ("/detokenize", {"tokens": "12"}, "tokens"),
    ("/detokenize", {"model": "gpt-9", "tokens": [1]}, "model"),
])
def test_tokenize_and_detokenize_refuse_bad_input_naming_the_field(client, path, body, param):
    response = client.post(path, json=body)
    assert response.status_code in (400, 404), response.text
    assert response.json()["error"]["param"] == param


# Sampling defaults (vLLM's --generation-config auto): the model's file, the embedded model's
# recommendation, settings on top.

def _model_dir(tmp_path: Path, config: dict) -> Path:
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    return tmp_path


def test_generation_config_supplies_the_defaults_and_settings_override_them(tmp_path):
    folder = _model_dir(tmp_path, {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.05,
                                   "max_new_tokens": 300, "bos_token_id": 1})
    d = resolve_sampling_defaults(Settings(), folder, embedded=False)
    assert (d.temperature, d.top_p, d.top_k, d.repetition_penalty, d.max_tokens) == (0.6, 0.95, 20, 1.05, 300)
    assert set(d.sources.values()) == {"generation_config.json"}

    d = resolve_sampling_defaults(Settings(default_temperature=0.0, default_max_tokens=8000, max_tokens_limit=1000),
                                  folder, embedded=False)
    assert (d.temperature, d.sources["temperature"], d.top_p) == (0.0, "settings", 0.95)
    assert d.max_tokens == 1000  # never above the accepted maximum

    ignored = resolve_sampling_defaults(Settings(generation_config="none"), folder, embedded=False)
    assert (ignored.temperature, ignored.top_p, ignored.top_k, ignored.max_tokens) == (1.0, 1.0, 0, 512)
    assert set(ignored.sources.values()) == {"openai"}


def test_the_embedded_recommendation_fills_only_what_the_file_leaves_out(tmp_path):
    folder = _model_dir(tmp_path, {"top_p": 0.8, "temperature": "hot", "max_new_tokens": -3})
    d = resolve_sampling_defaults(Settings(), folder, embedded=True)
    assert d.top_p == 0.8 and d.sources["top_p"] == "generation_config.json"
    assert (d.temperature, d.max_tokens) == (EMBEDDED_RECOMMENDED["temperature"], EMBEDDED_RECOMMENDED["max_tokens"])
    assert read_generation_config(folder) == {"top_p": 0.8}  # unusable values are skipped, not trusted
    assert read_generation_config(tmp_path / "nowhere") == {}


def test_the_missions_first_request_as_written_is_short_and_steered(server, client, lm):
    """``curl localhost:8000/v1/chat/completions -d '{"model": "default", "messages": [...],
    "steering": {"optimistic": 1.5}}'``: no temperature, no max_tokens."""
    defaults = server.state.sampling_defaults
    assert defaults.sources["temperature"] == "recommended" and defaults.temperature <= 0.3
    body = {"model": "default", "messages": [{"role": "user", "content": "Describe your morning."}]}
    steered = client.post("/v1/chat/completions", json={**body, "steering": {"optimistic": 1.5}, "seed": 7}).json()
    plain = client.post("/v1/chat/completions", json={**body, "seed": 7}).json()
    assert steered["usage"]["completion_tokens"] <= defaults.max_tokens == EMBEDDED_RECOMMENDED["max_tokens"]
    text = steered["choices"][0]["message"]["content"]
    assert text != plain["choices"][0]["message"]["content"]
    words = text.split()
    assert len(words) >= 20 and len(set(words)) / len(words) > 0.5  # prose, not a loop


def test_settings_override_the_defaults_on_a_live_server(lm, tmp_path):
    with make_server(lm, tmp_path, default_temperature=0.0, default_max_tokens=5) as live:
        body = {"model": "default", "messages": [{"role": "user", "content": "Describe your morning."}]}
        first = httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=120).json()
        second = httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=120).json()
    assert first["usage"]["completion_tokens"] == 5
    assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]  # greedy


def _bos_model_dir(lm, folder: Path) -> Path:
    """The default model with a tokenizer that adds BOS to every text, as Llama 3's tokenizer.json does."""
    source = Path(lm.model.name_or_path)
    for f in source.iterdir():
        if f.name != "tokenizer.json":
            (folder / f.name).symlink_to(f)
    spec = json.loads((source / "tokenizer.json").read_text())
    bos = lm.tokenizer.bos_token
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [lm.tokenizer.bos_token_id], "tokens": [bos]}},
    }
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    return folder


def test_a_text_completion_prompt_gets_the_bos_its_tokenizer_adds(lm, tmp_path):
    from steering.model import load_model
    from tests.conftest import CACHE_DIR

    (tmp_path / "model").mkdir()
    model_dir = _bos_model_dir(lm, tmp_path / "model")
    bos_lm = load_model(str(model_dir), dtype="float32", device="cpu", cache_dir=CACHE_DIR)
    bos = bos_lm.tokenizer.bos_token_id
    text = "The three primary colors are"
    plain = bos_lm.tokenizer(text, add_special_tokens=False).input_ids
    assert bos not in plain
    with make_server(bos_lm, tmp_path / "data") as live, httpx.Client(base_url=live.url, timeout=120) as c:
        counted = c.post("/tokenize", json={"prompt": text}).json()
        assert counted["tokens"] == [bos, *plain]
        body = {"model": "default", "temperature": 0, "max_tokens": 6}
        out = c.post("/v1/completions", json={**body, "prompt": text}).json()
        assert out["usage"]["prompt_tokens"] == counted["count"]
        # The engine got exactly those ids: the same ids sent as a token prompt give the same answer.
        ids = c.post("/v1/completions", json={**body, "prompt": counted["tokens"]}).json()
        assert ids["choices"][0]["text"] == out["choices"][0]["text"]
        # A chat's template writes its own special tokens: none are added on top, on either route.
        messages = [{"role": "user", "content": text}]
        chat_counted = c.post("/tokenize", json={"messages": messages}).json()
        template = bos_lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert chat_counted["tokens"] == bos_lm.tokenizer(template, add_special_tokens=False).input_ids
        usage = c.post("/v1/chat/completions", json={**body, "messages": messages}).json()["usage"]
        assert usage["prompt_tokens"] == chat_counted["count"]
