"""LoRA adapters: load, list, upload and unload as vLLM's clients do; bad adapters refused naming
the field; per request in mixed batches with steering, token-exact against PEFT's own model."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file, save_file

from steering.adapters import AdapterError, AdapterStore, LoraStep, read_adapter
from steering.engine import Engine, GenerationRequest, TokenOut
from steering.sampling import SamplingParams
from steering.store import SharedStore
from tests.conftest import make_server, wait_job

PROMPT = "Describe your morning."
ALL_PARTS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft_base(lm):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(lm.model.name_or_path, dtype=torch.float32)


def _make_adapter(lm, out: Path, seed: int, targets: list[str], r: int, **config) -> Path:
    """A LoRA adapter made by PEFT on the default model, both matrices random (PEFT's default B
    of zeros would change nothing), saved as PEFT saves it."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(_peft_base(lm), LoraConfig(r=r, target_modules=targets, init_lora_weights=False, **config))
    with torch.no_grad():  # keep the change visible but the text still language
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.5)
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def adapter_dirs(lm, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "persona-all": _make_adapter(lm, root / "persona-all", 1, ALL_PARTS, 8, lora_alpha=16),
        "persona-qv": _make_adapter(lm, root / "persona-qv", 2, ["q_proj", "v_proj"], 4, lora_alpha=8, use_rslora=True),
    }


@pytest.fixture(scope="module")
def prompt_ids(lm):
    ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.fixture(scope="module")
def live(lm, adapter_dirs, tmp_path_factory):
    data = tmp_path_factory.mktemp("adapter-server")
    with make_server(lm, data, max_loras=3, max_lora_rank=16,
                     lora_modules=[f"persona-all={adapter_dirs['persona-all']}"]) as server:
        yield server


@pytest.fixture()
def c(live):
    with httpx.Client(base_url=live.url, timeout=300) as client:
        yield client


def _chat(c: httpx.Client, model: str, **fields) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "temperature": 0, "max_tokens": 24}
    return c.post("/v1/chat/completions", json={**body, **fields})


def _text(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def _greedy(engine: Engine, requests: list[GenerationRequest]) -> list[list[int]]:
    """Run ``requests`` as one batch, stepped here (the joins are exact)."""
    events = [engine.add_request(r) for r in requests]
    while engine.step():
        pass
    return [[e.token_id for e in ev if isinstance(e, TokenOut)] for ev in events]


@pytest.mark.timeout(1200)  # minutes on a 2-core machine shared with other work
def test_adapter_greedy_tokens_equal_peft_and_do_not_depend_on_the_batch(lm, adapter_dirs, prompt_ids):
    from peft import PeftModel

    adapter = read_adapter(adapter_dirs["persona-all"], lm)
    other = read_adapter(adapter_dirs["persona-qv"], lm)
    eos = sorted(lm.eos_token_ids)
    # PEFT's model, float32 like the engine here, greedy with EOS excluded (as ignore_eos does).
    model = PeftModel.from_pretrained(_peft_base(lm), str(adapter_dirs["persona-all"])).eval()
    ids, past, reference = torch.tensor([prompt_ids]), None, []
    with torch.no_grad():
        for _ in range(32):
            out = model(input_ids=ids, past_key_values=past, use_cache=True)
            logits = out.logits[0, -1]
            logits[eos] = float("-inf")
            ids, past = logits.argmax().view(1, 1), out.past_key_values
            reference.append(int(ids))

    params = SamplingParams(max_new_tokens=32, temperature=0, ignore_eos=True)
    engine = Engine(lm, max_batch_size=8, max_model_len=256)
    try:
        alone = _greedy(engine, [GenerationRequest(prompt_ids=prompt_ids, sampling=params, adapter=adapter)])[0]
        mixed = _greedy(engine, [
            GenerationRequest(prompt_ids=prompt_ids[:7], sampling=params),
            GenerationRequest(prompt_ids=prompt_ids, sampling=params, adapter=other),
            GenerationRequest(prompt_ids=prompt_ids, sampling=params, adapter=adapter),
        ])
    finally:
        engine.shutdown()
    assert alone == reference
    assert mixed[2] == alone
    # The HF forward (models the fused one does not cover) applies adapters through hooks.
    hf = Engine(lm, max_batch_size=2, max_model_len=128, fused=False)
    try:
        short = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
        assert _greedy(hf, [GenerationRequest(prompt_ids=prompt_ids, sampling=short, adapter=adapter)])[0] == reference[:6]
    finally:
        hf.shutdown()


def test_a_tokens_delta_is_the_same_whatever_shares_its_step(lm, adapter_dirs):
    adapter = read_adapter(adapter_dirs["persona-all"], lm)
    other = read_adapter(adapter_dirs["persona-qv"], lm)
    torch.manual_seed(0)
    x = torch.randn(37, lm.hidden_size)
    out = torch.zeros(37, 960)
    LoraStep.build([(adapter, list(range(37)))], torch.device("cpu")).add_fused(3, "qkv", x, out)
    for n in (1, 2, 8):
        alone = torch.zeros(n, 960)
        LoraStep.build([(adapter, list(range(n)))], torch.device("cpu")).add_fused(3, "qkv", x[37 - n:], alone)
        assert torch.equal(alone, out[37 - n:])
    # One gathered call for several adapters: each row gets its own adapter's delta, the same as
    # with its adapter alone in the step, in float32 and in bfloat16.
    for dtype in (torch.float32, torch.bfloat16):
        base = torch.randn(37, 960).to(dtype)
        xs = x.to(dtype)
        mixed = base.clone()
        LoraStep.build([(adapter, list(range(0, 37, 2))), (other, list(range(1, 37, 2)))],
                       torch.device("cpu")).add_fused(3, "qkv", xs, mixed)
        for lora, rows in ((adapter, range(0, 37, 2)), (other, range(1, 37, 2))):
            single = base.clone()
            LoraStep.build([(lora, list(rows))], torch.device("cpu")).add_fused(3, "qkv", xs, single)
            assert torch.equal(mixed[list(rows)], single[list(rows)])
            assert not torch.equal(single[list(rows)], base[list(rows)])
    # Without the CPU kernels (PERSONA_CPU_KERNELS=0, no compiler) the elementwise products keep
    # the guarantee and give the same deltas up to float32 rounding.
    elementwise = read_adapter(adapter_dirs["persona-all"], dataclasses.replace(lm, kernels=None)).fused[(3, "qkv")]
    plain = torch.zeros(37, 960)
    elementwise.add_to(x, plain, torch.arange(37))
    assert torch.allclose(plain, out, rtol=1e-5, atol=1e-6)
    for n in (1, 2, 8):
        alone = torch.zeros(n, 960)
        elementwise.add_to(x[37 - n:], alone, torch.arange(n))
        assert torch.equal(alone, plain[37 - n:])


def test_load_list_unload_as_vllm_clients_do(c, adapter_dirs, lm):
    cards = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
    assert cards["persona-all"]["parent"] == lm.name  # loaded by --lora-modules at startup
    assert "persona-qv" not in cards
    assert c.post("/v1/chat/completions", json={"model": "persona-qv", "messages": [{"role": "user", "content": "hi"}]}
                  ).json()["error"]["param"] == "model"
    r = c.post("/v1/load_lora_adapter", json={"lora_name": "persona-qv", "lora_path": str(adapter_dirs["persona-qv"])})
    assert r.status_code == 200, r.text
    assert r.json()["target_modules"] == ["q_proj", "v_proj"]
    assert "persona-qv" in {m["id"] for m in c.get("/v1/models").json()["data"]}
    before = _samples(c)
    response = _chat(c, "persona-qv")
    assert response.json()["model"] == "persona-qv"
    assert _text(response) != _text(_chat(c, "default"))
    after = _samples(c)
    # Tokens and latencies by adapter: the adapter's request under its name, the base's under "".
    usage = response.json()["usage"]
    for name, key in (("persona_generation_tokens_total", "completion_tokens"), ("persona_prompt_tokens_total", "prompt_tokens")):
        assert after[(name, (("adapter", "persona-qv"),))] == usage[key]
        assert _delta(before, after, name, adapter="") > 0
    assert after[("persona_adapter_requests_total", (("adapter", "persona-qv"),))] == 1
    assert _delta(before, after, "persona_time_to_first_token_seconds_count", adapter="persona-qv") == 1
    assert _delta(before, after, "persona_queue_wait_seconds_count", adapter="persona-qv") == 1
    assert c.post("/v1/unload_lora_adapter", json={"lora_name": "persona-qv"}).status_code == 200
    gone = _chat(c, "persona-qv")
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "model"
    assert "persona-qv" not in {m["id"] for m in c.get("/v1/models").json()["data"]}
    # The label takes loaded names only: an unloaded adapter's series are gone.
    assert not [key for key in _samples(c) if ("adapter", "persona-qv") in key[1]]


def _samples(c: httpx.Client) -> dict[tuple, float]:
    """Every sample of ``/metrics``, keyed by (name, sorted labels)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(c.get("/metrics").text) for s in family.samples}


def _delta(before: dict, after: dict, name: str, **labels: str) -> float:
    """The change of ``name`` summed over the series whose labels include ``labels``."""
    def total(samples: dict) -> float:
        return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))
    return total(after) - total(before)


def _tar(directory: Path, names=("adapter_config.json", "adapter_model.safetensors")) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name in names:
            archive.add(directory / name, arcname=name)
    return buffer.getvalue()


def test_upload_serves_what_a_path_load_serves(c, adapter_dirs):
    by_path = _text(_chat(c, "persona-all"))
    body = _tar(adapter_dirs["persona-all"])
    r = c.put("/v1/adapters/uploaded", content=body, headers={"Content-Type": "application/x-tar"})
    assert r.status_code == 201, r.text
    assert c.put("/v1/adapters/uploaded", content=body, headers={"Content-Type": "application/x-tar"}).status_code == 200
    assert _text(_chat(c, "uploaded")) == by_path
    assert c.delete("/v1/adapters/uploaded").status_code == 200
    assert _chat(c, "uploaded").status_code == 404


def _variant(src: Path, dst: Path, config: dict | None = None, tensors=None, config_text: str | None = None) -> Path:
    dst.mkdir()
    base = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(config_text if config_text is not None else json.dumps({**base, **(config or {})}))
    weights = load_file(src / "adapter_model.safetensors")
    save_file(tensors(weights) if tensors else weights, dst / "adapter_model.safetensors")
    return dst


def test_bad_adapters_are_refused_naming_the_field_and_change_nothing(c, adapter_dirs, tmp_path, lm):
    src = adapter_dirs["persona-qv"]
    q_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

    def wrong_shape(w):
        return {**w, q_a: torch.zeros(4, 7)}

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04not loaded")
    other_model = _variant(src, tmp_path / "other-model")
    (other_model / "persona.json").write_text(json.dumps({"base_fingerprint": "0123456789abcdef"}))
    cases = [
        (_variant(src, tmp_path / "malformed", config_text="{not json"), 400, "adapter_config.json"),
        (_variant(src, tmp_path / "not-lora", {"peft_type": "IA3"}), 400, "peft_type"),
        (_variant(src, tmp_path / "dora", {"use_dora": True}), 400, "use_dora"),
        (_variant(src, tmp_path / "shape", tensors=wrong_shape), 400, q_a),
        (_variant(src, tmp_path / "rank", {"r": 32, "rank_pattern": {}},
                  tensors=lambda w: {k: (v.repeat(8, 1) if "lora_A" in k else v.repeat(1, 8)) for k, v in w.items()}),
         400, "r"),
        (pickled, 400, "adapter_model.bin"),
        (other_model, 409, "base_fingerprint"),
        (tmp_path / "missing", 400, "lora_path"),
    ]
    before = c.get("/v1/models").json()["data"]
    for path, status, param in cases:
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(path)})
        assert (r.status_code, r.json()["error"]["param"]) == (status, param), (path.name, r.text)
    bad_tar = c.put("/v1/adapters/bad", content=_tar(src, names=("adapter_config.json",)),
                    headers={"Content-Type": "application/x-tar"})
    assert (bad_tar.status_code, bad_tar.json()["error"]["param"]) == (400, "adapter_model.safetensors")
    assert c.get("/v1/models").json()["data"] == before
    with pytest.raises(AdapterError):
        read_adapter(tmp_path / "shape", lm)

    # Past PERSONA_MAX_LORAS (3 here; persona-all is loaded): 409, and nothing evicted.
    for name in ("extra-1", "extra-2"):
        assert c.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(src)}).status_code == 200
    full = c.post("/v1/load_lora_adapter", json={"lora_name": "extra-3", "lora_path": str(src)})
    assert full.status_code == 409 and full.json()["error"]["param"] == "lora_name"
    taken = c.post("/v1/load_lora_adapter", json={"lora_name": "extra-1", "lora_path": str(src)})
    assert taken.status_code == 409
    for name in ("extra-1", "extra-2"):
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 200
    assert c.post("/v1/unload_lora_adapter", json={"lora_name": "extra-1"}).status_code == 404


def test_mixed_batch_with_steering_and_monitors(c, client, live):
    """Adapter rows with and without steering beside base rows, all at once: every row answers
    what it answers alone; base rows answer what a server without adapters answers."""
    base_elsewhere = _text(_chat(client, "default"))  # the shared server: no adapters loaded
    steer = {"steering": {"optimistic": 4.0}}
    asks = [("persona-all", {}), ("persona-all", steer), ("default", {}), ("default", steer)]
    alone = [_text(_chat(c, model, **fields)) for model, fields in asks]
    assert alone[2] == base_elsewhere
    assert alone[0] != alone[1] != alone[3]  # steering changes the adapter's answer
    with ThreadPoolExecutor(len(asks) * 2) as pool:
        together = list(pool.map(lambda a: _text(_chat(c, a[0], **a[1])), asks * 2))
    assert together == alone * 2

    # Monitors read the adapter row's last prompt token: the adapter moves the reading, and the
    # metrics keep the adapter's readings and verdicts apart from the base model's.
    assert c.put("/v1/monitors/optimistic", json={"mode": "annotate"}).status_code == 200
    before = _samples(c)
    try:
        scores = [_chat(c, model, monitor={"return_scores": True}).json()["persona_monitor"]["scores"]["optimistic"]
                  for model in ("default", "persona-all")]
    finally:
        c.delete("/v1/monitors/optimistic")
    after = _samples(c)
    assert scores[0]["score"] != scores[1]["score"]
    for adapter in ("", "persona-all"):
        assert _delta(before, after, "persona_monitor_score_count", vector="optimistic", adapter=adapter) == 1
        assert _delta(before, after, "persona_monitor_decisions_total", vector="optimistic", adapter=adapter) == 1


SCREEN_DATA = Path(__file__).parent / "data" / "screen_mixed.jsonl"


def test_assessment_and_screening_measure_an_adapter(c):
    """``model`` names the adapter that assessment and screening run with: the same tools that
    measure the base model measure what an adapter does to it."""
    def assessed(**fields) -> dict:
        r = c.post("/v1/assess", json={"inventory": "mbti", "repetitions": 2, **fields})
        assert r.status_code == 200, r.text
        return r.json()

    base, adapted = assessed(), assessed(model="persona-all")
    assert (base["model"], adapted["model"]) == (live_model(c), "persona-all")
    assert adapted["dimensions"] != base["dimensions"]

    def screened(**params) -> list[dict]:
        lines = SCREEN_DATA.read_bytes().splitlines(keepends=True)[:3]
        r = c.post("/v1/screen", params={"vectors": "optimistic", "max_new_tokens": 8, **params},
                   content=b"".join(lines), headers={"Content-Type": "application/x-ndjson"})
        assert r.status_code == 202, r.text
        job = wait_job(c, r.json()["id"])
        assert job["status"] == "succeeded", job
        assert job["result"]["model"] == params.get("model", live_model(c))
        return [json.loads(line)["scores"]["optimistic"] for line in c.get(f"/v1/jobs/{job['id']}/output").text.splitlines()]

    base_rows, adapter_rows = screened(), screened(model="persona-all")
    assert len(base_rows) == len(adapter_rows) == 3
    assert all(b["train"] != a["train"] and b["natural"] != a["natural"] for b, a in zip(base_rows, adapter_rows))

    # An adapter that is not loaded: 404 naming the field, before any work starts.
    for r in (c.post("/v1/assess", json={"model": "not-loaded"}),
              c.post("/v1/screen", params={"vectors": "optimistic", "model": "not-loaded"}, content=b"{}\n"),
              c.post("/v1/vectors/extract", json={"trait_name": "optimistic", "model": "not-loaded"})):
        assert (r.status_code, r.json()["error"]["param"]) == (404, "model"), r.text


def test_cli_screens_through_an_adapter(adapter_dirs, tmp_path):
    data = tmp_path / "three.jsonl"
    data.write_bytes(b"".join(SCREEN_DATA.read_bytes().splitlines(keepends=True)[:3]))

    def train_projections(*extra: str) -> list[float]:
        out = tmp_path / "rows.jsonl"
        done = subprocess.run([sys.executable, "-m", "app.cli", "screen", str(data), "--vector", "optimistic",
                               "--no-generate", "--out", str(out), *extra], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "PERSONA_DATA_DIR": str(tmp_path / "data")})
        assert done.returncode == 0, done.stderr[-2000:]
        return [json.loads(line)["scores"]["optimistic"]["train"] for line in out.read_text().splitlines()]

    base, adapted = train_projections(), train_projections("--adapter", str(adapter_dirs["persona-all"]))
    assert len(base) == len(adapted) == 3 and all(b != a for b, a in zip(base, adapted))


def live_model(c: httpx.Client) -> str:
    return c.get("/v1/models").json()["data"][0]["id"]


def test_adapters_survive_a_restart(lm, adapter_dirs, tmp_path):
    with make_server(lm, tmp_path) as first:
        r = httpx.post(f"{first.url}/v1/load_lora_adapter", timeout=60,
                       json={"lora_name": "kept", "lora_path": str(adapter_dirs["persona-qv"])})
        assert r.status_code == 200, r.text
        answer = _text(_chat(httpx.Client(base_url=first.url, timeout=300), "kept"))
    with make_server(lm, tmp_path) as second, httpx.Client(base_url=second.url, timeout=300) as c2:
        assert "kept" in {m["id"] for m in c2.get("/v1/models").json()["data"]}
        assert _text(_chat(c2, "kept")) == answer


def wait_until(condition, within: float) -> bool:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_an_adapter_loaded_on_one_replica_is_served_by_the_other(lm, adapter_dirs, tmp_path):
    """Two servers on one data directory (replicas): a load through one is served by the other
    after its poll, an unload through one is a 404 on both, with its metrics series gone."""
    with make_server(lm, tmp_path, store_poll_s=0.2) as one, make_server(lm, tmp_path, store_poll_s=0.2) as two, \
            httpx.Client(base_url=one.url, timeout=300) as c1, httpx.Client(base_url=two.url, timeout=300) as c2:
        r = c1.post("/v1/load_lora_adapter", json={"lora_name": "shared", "lora_path": str(adapter_dirs["persona-qv"])})
        assert r.status_code == 200, r.text
        assert wait_until(lambda: "shared" in {m["id"] for m in c2.get("/v1/models").json()["data"]}, 30)
        assert _text(_chat(c2, "shared")) == _text(_chat(c1, "shared"))
        assert ("persona_generation_tokens_total", (("adapter", "shared"),)) in _samples(c2)

        assert c1.post("/v1/unload_lora_adapter", json={"lora_name": "shared"}).status_code == 200
        assert wait_until(lambda: _chat(c2, "shared").status_code == 404, 30)
        assert not [key for key in _samples(c2) if ("adapter", "shared") in key[1]]


def test_a_starting_replica_leaves_another_replicas_write_in_progress_alone(lm, tmp_path):
    """The leftovers of an interrupted write are removed at startup, but only under the store's
    lock: a replica starting while another is between writing and renaming must wait."""
    in_progress = tmp_path / "adapters" / ".new.tmp-0123abcd"
    in_progress.mkdir(parents=True)
    (in_progress / "adapter_config.json").write_text("{}")
    starting = AdapterStore(tmp_path / "adapters", lm, store=SharedStore(tmp_path))
    with SharedStore(tmp_path).lock():  # another replica, mid-write
        thread = threading.Thread(target=starting.load_all)
        thread.start()
        thread.join(1.0)
        assert thread.is_alive() and in_progress.exists()
    thread.join(60)
    assert not thread.is_alive() and not in_progress.exists()  # once the writer is done, a leftover
