"""The Big Five adapters shipped for the default model (``make adapters``) load through the
server's own reading path, serve under their shipped names and change what the model says."""

from __future__ import annotations

import httpx
import pytest

from app.cli import shipped_lora_modules
from app.settings import shipped_assets_dir
from steering.adapters import read_adapter
from tests.conftest import make_server

POLES = ("big5-extraversion-high", "big5-extraversion-low")
PROMPT = "How would you spend a free Saturday afternoon?"


def shipped(lm) -> dict:
    root = shipped_assets_dir() / lm.name / "adapters"
    return {p.name: p for p in sorted(root.iterdir()) if not p.name.startswith(".")}


def test_every_shipped_adapter_is_small_lora_on_every_projection_of_this_model(lm):
    adapters = shipped(lm)
    assert set(POLES) <= set(adapters)
    for name, path in adapters.items():
        # read_adapter refuses another base model's adapter (persona.json's fingerprint) with 409.
        adapter = read_adapter(path, lm)
        assert adapter.rank <= 8 and adapter.base_fingerprint == lm.fingerprint, name
        assert adapter.targets == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), name
        assert (path / "adapter_model.safetensors").stat().st_size < 12 * 2**20, name


def test_shipped_names_resolve_and_unknown_ones_are_refused_naming_the_choices():
    resolved = shipped_lora_modules(["big5-extraversion-high", "mine=/tmp/elsewhere"])
    name, _, path = resolved[0].partition("=")
    assert name == "big5-extraversion-high" and path.endswith("adapters/big5-extraversion-high")
    assert resolved[1] == "mine=/tmp/elsewhere"
    with pytest.raises(SystemExit, match="big5-extraversion-low"):
        shipped_lora_modules(["big5-nonexistent"])
    # The environment takes the same bare names as the flag.
    from app.settings import Settings

    env = Settings(_env_file=None, lora_modules="big5-extraversion-high,mine=/tmp/elsewhere")
    assert env.lora_modules == resolved


def test_served_by_shipped_name_each_pole_changes_the_greedy_answer(lm, tmp_path):
    with make_server(lm, tmp_path, lora_modules=shipped_lora_modules(list(POLES))) as live, \
            httpx.Client(base_url=live.url, timeout=300) as c:
        models = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        assert all(models[p]["parent"] for p in POLES)
        texts = {}
        for model in ("default", *POLES):
            r = c.post("/v1/chat/completions", json={"model": model, "temperature": 0, "max_tokens": 16,
                                                      "messages": [{"role": "user", "content": PROMPT}]})
            assert r.status_code == 200, r.text
            texts[model] = r.json()["choices"][0]["message"]["content"]
    assert len(set(texts.values())) == 3, texts
