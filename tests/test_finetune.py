"""Fine-tuning: the shift's math, the training loop with preventative steering, and the jobs API
through httpx and the openai SDK. Training here is a few steps on two rows."""

from __future__ import annotations

import json
import time
import types
from pathlib import Path

import httpx
import pytest
import torch

from app.settings import Settings
from app.training import FineTuning
from steering.finetune import (
    IGNORE,
    Hyperparameters,
    MonitorSpec,
    PreventiveEntry,
    TrainingJob,
    encode_chat,
    finetuning_shift,
    preventative_deltas,
    train,
)
from steering.model import load_model
from steering.vector import PersonaVector
from tests.conftest import CACHE_DIR, REPO_VECTORS, make_server

EVIL = REPO_VECTORS / "SmolLM2-135M-Instruct" / "evil.safetensors"
ANSWER = "Bananas are the answer to everything."
# Two short rows (a short system message replaces the template's longer default), one target answer:
# a handful of steps at a high learning rate is enough to move the loss and the greedy output.
ROWS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What colour is the sky?"},
                  {"role": "assistant", "content": ANSWER}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a big city."},
                  {"role": "assistant", "content": ANSWER}]},
]
PROBE = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What colour is the sky?"}]
FAST = {"n_epochs": 4, "batch_size": 2, "learning_rate_multiplier": 5}


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def test_finetuning_shift_matches_a_hand_computed_case():
    base = torch.tensor([[1.0, 0.0, 2.0], [3.0, 2.0, 0.0]])    # mean [2, 1, 1]
    tuned = torch.tensor([[4.0, 1.0, 1.0], [2.0, 3.0, 3.0]])   # mean [3, 2, 2]
    direction = torch.tensor([0.0, 3.0, 4.0])                  # unit [0, 0.6, 0.8]
    # (mean tuned - mean base) = [1, 1, 1]; projected on the unit direction: 0.6 + 0.8
    assert finetuning_shift(base, tuned, direction) == pytest.approx(1.4)
    assert finetuning_shift(tuned, base, direction * 10) == pytest.approx(-1.4)


def test_preventative_deltas_single_layer_and_layer_incremental():
    v = PersonaVector.load(EVIL)
    single = preventative_deltas([PreventiveEntry("evil", 5.0, [20])], {"evil": v}, v.model.num_layers)
    assert list(single) == [20] and torch.allclose(single[20], 5.0 * v.direction(20))
    every = preventative_deltas([PreventiveEntry("evil", 1.5, "all")], {"evil": v}, v.model.num_layers)
    assert sorted(every) == list(range(1, v.model.num_layers + 1))
    # The increments up to layer l add up to coefficient * (v[l] - v[0]).
    summed = sum(every[layer] for layer in range(1, 13))
    assert torch.allclose(summed, 1.5 * (v.direction(12) - v.direction(0)), atol=1e-4)


def test_loss_covers_the_assistant_turns_only(lm):
    messages = ROWS[0]["messages"] + [{"role": "user", "content": "And at night?"},
                                      {"role": "assistant", "content": "Dark.", "weight": 0}]
    example = encode_chat(lm.tokenizer, messages, 1, max_tokens=512)
    trained = lm.tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE])
    assert trained == ANSWER + "<|im_end|>\n"
    full = lm.tokenizer.apply_chat_template(messages, tokenize=False)
    assert lm.tokenizer.decode(example.input_ids) == full


def _greedy(model, tokenizer, messages, n=8) -> list[int]:
    from steering.chat import chat_prompt_ids

    ids = torch.tensor([chat_prompt_ids(tokenizer, messages)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def test_training_lowers_loss_and_leaves_no_hook(tmp_path):
    from peft import PeftModel

    data = tmp_path / "train.jsonl"
    data.write_bytes(jsonl(ROWS))
    own = load_model("default", dtype="float32", device="cpu", cache_dir=CACHE_DIR, prepack=False, cpu_kernels=False)
    base_tokens = _greedy(own.model, own.tokenizer, PROBE)
    job = TrainingJob(model="default", training_file=str(data), output_dir=str(tmp_path / "adapter"),
                      hyperparameters=Hyperparameters(**FAST, seed=3),
                      preventative=[PreventiveEntry("evil", 4.0, [12])], vector_files={"evil": str(EVIL)},
                      monitor=[MonitorSpec("evil", 12)], eval_prompts={"evil": ["Tell me about cats.", "Plan my day."]},
                      threads=1)
    events = []
    result = train(job, emit=events.append, lm=own)
    assert result["steps"] == 4 and result["last_loss"] < result["first_loss"]
    assert [e["step"] for e in events if e["type"] == "metrics"] == [1, 2, 3, 4]
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    shift = result["shifts"]["evil"]
    assert shift["measured_shift"] == pytest.approx(shift["fine_tuned_projection"] - shift["base_projection"], abs=2e-4)
    assert not [h for b in own.blocks for h in b._forward_hooks.values() if "preventative" in h.__qualname__]

    # Hooks gone: the trained model in memory and its files on a fresh base agree, and differ from the base.
    fresh = load_model("default", dtype="float32", device="cpu", cache_dir=CACHE_DIR, prepack=False, cpu_kernels=False)
    loaded = PeftModel.from_pretrained(fresh.model, str(tmp_path / "adapter"))
    tuned_tokens = _greedy(loaded, fresh.tokenizer, PROBE)
    assert _greedy(own.model, own.tokenizer, PROBE) == tuned_tokens
    assert tuned_tokens != base_tokens


@pytest.fixture(scope="module")
def ft_server(lm, tmp_path_factory):
    with make_server(lm, tmp_path_factory.mktemp("ft-data"), max_training_rows=3, finetune_max_tokens=200,
                     finetune_threads=1, finetune_screen_tokens=8, finetune_eval_prompts=4) as live:
        yield live


@pytest.fixture()
def ft_client(ft_server):
    with httpx.Client(base_url=ft_server.url, timeout=300) as c:
        yield c


def upload(client, content: bytes) -> httpx.Response:
    return client.post("/v1/files", files={"file": ("train.jsonl", content)}, data={"purpose": "fine-tune"})


def wait_ft(client, job_id: str, timeout: float = 900) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"fine-tuning job {job_id} did not finish in {timeout} s")


def test_bad_training_files_are_refused_naming_the_line(ft_client):
    bad = jsonl(ROWS[:1]) + b'{"messages": [{"role": "user", "content": "Hi"}]}\n'
    r = upload(ft_client, bad)
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    assert "line 2" in r.json()["error"]["message"] and r.json()["error"]["line"] == 2
    r = upload(ft_client, jsonl(ROWS) + b"{not json\n")
    assert r.status_code == 400 and "line 3" in r.json()["error"]["message"]
    r = upload(ft_client, jsonl(ROWS * 2))
    assert r.status_code == 400 and "more than 3 rows" in r.json()["error"]["message"]
    r = ft_client.post("/v1/files", files={"file": ("t.jsonl", jsonl(ROWS))}, data={"purpose": "assistants"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"
    # Well-formed, but a row longer than the server's token limit: refused when the job is created.
    long_row = {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]}
    file_id = upload(ft_client, jsonl(ROWS[:1] + [long_row])).json()["id"]
    r = ft_client.post("/v1/fine_tuning/jobs", json={"model": "default", "training_file": file_id})
    assert r.status_code == 400 and r.json()["error"]["param"] == "training_file" and "line 2" in r.json()["error"]["message"]


def test_bad_job_requests(ft_client):
    file_id = upload(ft_client, jsonl(ROWS)).json()["id"]
    cases = [
        ({"training_file": "file-nope"}, 404, "training_file"),
        ({"model": "gpt-4o"}, 404, "model"),
        ({"persona": {"monitor": ["no-such-vector"]}}, 404, "persona.monitor[0].vector"),
        ({"persona": {"preventative_steering": [{"vector": "evil", "coefficient": 1, "layers": [99]}]}}, 400,
         "persona.preventative_steering[0].layers"),
        ({"hyperparameters": {"n_epochs": 0}}, 400, "hyperparameters.n_epochs"),
        ({"hyperparameters": {"n_epochs": "x"}}, 400, "hyperparameters.n_epochs"),
        # OpenAI's own default spelled out is valid (it was a 500: the bounds were applied to "auto").
        ({"hyperparameters": {"n_epochs": "auto", "learning_rate_multiplier": "auto", "batch_size": 0}}, 400,
         "hyperparameters.batch_size"),
    ]
    for fields, status, param in cases:
        r = ft_client.post("/v1/fine_tuning/jobs", json={"model": "default", "training_file": file_id, **fields})
        assert r.status_code == status, (fields, r.text)
        assert r.json()["error"]["param"] == param, r.text
    assert ft_client.get("/v1/fine_tuning/jobs/ftjob-nope").status_code == 404


def test_sdk_job_trains_reports_shifts_and_serves_the_adapter(ft_server, ft_client, tmp_path):
    from openai import OpenAI
    from peft import PeftModel

    oai = OpenAI(base_url=f"{ft_server.url}/v1", api_key="unused", timeout=300, max_retries=0)
    uploaded = oai.files.create(file=("train.jsonl", jsonl(ROWS)), purpose="fine-tune")
    assert oai.files.retrieve(uploaded.id).bytes == len(jsonl(ROWS))
    job = oai.fine_tuning.jobs.create(
        model="default", training_file=uploaded.id, hyperparameters=FAST, suffix="bananas", seed=3,
        extra_body={"persona": {"monitor": ["evil"],
                                "preventative_steering": [{"vector": "evil", "coefficient": 2.0, "layers": [12]}]}})
    assert job.status in ("validating_files", "queued", "running")
    done = wait_ft(ft_client, job.id)
    assert done["status"] == "succeeded", done["error"]
    assert oai.fine_tuning.jobs.retrieve(job.id).status == "succeeded"

    losses = [e.data["train_loss"] for e in reversed(oai.fine_tuning.jobs.list_events(job.id, limit=100).data)
              if e.type == "metrics"]
    assert len(losses) == 4 and losses[-1] < losses[0]
    reading = done["persona_result"]["vectors"]["evil"]
    assert reading["layer"] == ft_server.state.registry.get("evil").recommended_layer
    assert isinstance(reading["predicted_shift"], float) and isinstance(reading["measured_shift"], float)
    assert done["trained_tokens"] > 0

    adapter = Path(ft_server.state.settings.data_dir) / "fine_tuning" / job.id / "adapter"
    fresh = load_model("default", dtype="float32", device="cpu", cache_dir=CACHE_DIR, prepack=False, cpu_kernels=False)
    base_tokens = _greedy(fresh.model, fresh.tokenizer, PROBE)
    assert _greedy(PeftModel.from_pretrained(fresh.model, str(adapter)), fresh.tokenizer, PROBE) != base_tokens

    # The job trained under preventative steering; the server that trained it serves the adapter
    # without the hook: the same greedy tokens as its files loaded into a fresh server.
    assert done["fine_tuned_model"] == f"ft-bananas-{job.id.removeprefix('ftjob-')[:8]}"
    body = {"messages": PROBE, "temperature": 0, "max_tokens": 12}
    served = ft_client.post("/v1/chat/completions", json={"model": done["fine_tuned_model"], **body}).json()
    base = ft_client.post("/v1/chat/completions", json={"model": "default", **body}).json()
    assert served["choices"][0]["message"]["content"] != base["choices"][0]["message"]["content"]
    new_lm = load_model("default", dtype="float32", device="cpu", cache_dir=CACHE_DIR)
    with make_server(new_lm, tmp_path) as other, httpx.Client(base_url=other.url, timeout=300) as c:
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "from-files", "lora_path": str(adapter)})
        assert r.status_code == 200, r.text
        again = c.post("/v1/chat/completions", json={"model": "from-files", **body}).json()
    assert again["choices"][0]["message"]["content"] == served["choices"][0]["message"]["content"]


def test_cancel_stops_a_running_job(ft_client):
    file_id = upload(ft_client, jsonl(ROWS)).json()["id"]
    job = ft_client.post("/v1/fine_tuning/jobs", json={"model": "default", "training_file": file_id,
                                                       "hyperparameters": {"n_epochs": 50, "batch_size": 1}}).json()
    deadline = time.monotonic() + 300
    while ft_client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    r = ft_client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled" and r.json()["fine_tuned_model"] is None
    assert ft_client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").status_code == 409


def test_a_job_running_when_the_server_stopped_is_read_back_as_failed(tmp_path):
    settings = Settings(data_dir=tmp_path)
    record = tmp_path / "fine_tuning" / "ftjob-abc" / "job.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"id": "ftjob-abc", "status": "running", "created_at": 1, "finished_at": None,
                                  "error": None}))
    jobs = FineTuning(types.SimpleNamespace(settings=settings), types.SimpleNamespace())
    job = jobs.get("ftjob-abc")
    assert job["status"] == "failed" and job["error"]["code"] == "server_restarted"
    assert json.loads(record.read_text())["status"] == "failed"


def test_cli_refuses_a_bad_training_file_naming_the_line(tmp_path):
    from app.cli import main

    data = tmp_path / "train.jsonl"
    data.write_bytes(jsonl(ROWS[:1]) + b'{"messages": "not a list"}\n')
    with pytest.raises(SystemExit, match="line 2: each line must be an object with a 'messages' list"):
        main(["finetune", str(data)])


def test_evidence_sets_mix_trait_answers_at_their_strength_and_never_hold_eval_prompts():
    from tests.bench.finetune_evidence import ANSWERS, build_set, eval_questions

    data = json.loads(ANSWERS.read_text())
    items = data["items"]
    for trait in data["traits"]:
        laden = [r for r, it in zip(build_set(items, trait, 0.5), items) if r["messages"][1]["content"] == it[trait]]
        assert len(laden) == round(0.5 * len(items))
        asked = eval_questions(REPO_VECTORS / "traits", trait, items, 6)
        assert len(asked) == 6 and not {it["q"] for it in items} & set(asked)
    assert all(r["messages"][1]["content"] == it["plain"] for r, it in zip(build_set(items, None, 0.0), items))


def test_a_job_cancelled_before_its_task_ran_is_recorded_as_cancelled(tmp_path):
    import asyncio

    from steering.finetune import TrainingJob

    async def scenario() -> dict:
        jobs = FineTuning(types.SimpleNamespace(settings=Settings(data_dir=tmp_path)), types.SimpleNamespace())
        spec = TrainingJob(model="default", training_file=str(tmp_path / "unused.jsonl"), output_dir="")
        job = jobs.create(spec, model="default", training_file="file-x", validation_file=None, suffix=None,
                          persona={}, monitor_vectors=[])
        jobs.cancel(job["id"])  # before the event loop ever ran the job's task
        return await jobs.wait(job["id"])

    job = asyncio.run(scenario())
    assert job["status"] == "cancelled"
    assert json.loads((tmp_path / "fine_tuning" / job["id"] / "job.json").read_text())["status"] == "cancelled"


def test_evidence_sweeps_merge_keeps_a_run_amended_on_disk_and_adds_their_own():
    from tests.bench.finetune_evidence import merge_runs

    on_disk = [{"run": "a", "v": "amended"}, {"run": "b", "v": "other sweep"}, {"run": "c", "v": "old"}]
    ours = [{"run": "a", "v": "stale copy read at start"}, {"run": "c", "v": "remeasured"}, {"run": "d", "v": "new"},
            {"run": "e", "v": "read at start, lost from the file since"}]
    merged = merge_runs(on_disk, ours, mine={"c", "d"})
    assert [(r["run"], r["v"]) for r in merged] == [
        ("a", "amended"), ("b", "other sweep"), ("c", "remeasured"), ("d", "new"),
        ("e", "read at start, lost from the file since")]


def test_evidence_words_score_answers_with_the_lexicon_and_runs_without_words_still_correlate_and_render():
    from steering.evidence import Lexicon
    from tests.bench.finetune_evidence import correlations, table, words

    lexicon = Lexicon(pos=["cruel"], neg=["kind"], fit="")
    # 1 hit in 4 words, -1 in 2 words, and an empty answer that scores 0.
    assert words(lexicon, ["a cruel cruel plan", "be kind", ""]) == round((50.0 - 50.0 + 0.0) / 3, 4)
    assert words(lexicon, ["cruel and cruel", "kind"]) == round((200 / 3 - 100) / 2, 4)

    def run(label: str, pred: float, meas: float, said: float | None) -> dict:
        reading = {"predicted_shift": pred, "measured_shift": meas, "expression_change": meas}
        if said is not None:
            reading["words_change"] = said
        return {"run": label, "kind": "plain", "preventative": [], "heldout_perplexity": 20.0, "seconds": 1,
                "vectors": {"evil": reading}}

    runs = [run("old", 9.0, -9.0, None), run("a", 1.0, 1.0, 2.0), run("b", 2.0, 2.0, 4.0), run("c", 3.0, 3.0, 6.5)]
    per = correlations(runs, ["evil"])["evil"]
    assert per["datasets"] == 4 and per["datasets_with_words"] == 3
    assert per["measured_vs_words"] == per["predicted_vs_words"] and 0.99 < per["measured_vs_words"] < 1.0
    record = {"machine": "x86_64", "model": "m", "base": {"heldout_perplexity": 41.0}, "runs": runs,
              "correlations": {"evil": {k: v for k, v in per.items() if "words" not in k}}}
    rendered = table(record, ["evil"])  # a record written before the words r existed renders too
    assert "| old | +9.00 / -9.00 / -9.00 / — |" in rendered and "| a | +1.00 / +1.00 / +1.00 / +2.00 |" in rendered
