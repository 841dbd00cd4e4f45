"""The vLLM backend's own pieces that run without starting vLLM: the CLI's check that it is
installed, which scheduled tokens of a forward pass produce a token (preemption recomputes),
the prefix-cache salt, and how an adapter is handed to vLLM's workers. The backend itself is exercised in tests/test_engine_contract.py."""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
import torch

from steering.adapters import read_adapter
from steering.engine import EngineError
from steering.vllm_engine import VLLMEngine, _salt, _vllm_rank
from steering.vllm_plugin import ChunkLayout, chunk_layout, encode_request

REPO = Path(__file__).resolve().parents[1]


def test_serve_with_the_vllm_engine_where_vllm_is_not_installed_says_what_to_install(tmp_path):
    # A real environment without vLLM: a fresh venv holding every package of this one but vLLM.
    env_dir = tmp_path / "env"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith("vllm"):
            (site / entry.name).symlink_to(entry)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    # A model path that does not exist: had the server begun loading, it would say so instead.
    run = subprocess.run([python, "-m", "app.cli", "serve", "--engine", "vllm", "--model", str(tmp_path / "none"),
                          "--data-dir", str(tmp_path / "data")], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert "make install-vllm" in lines[0] and "persona-server[vllm]" in lines[0]
    assert run.stdout == "" and not (tmp_path / "data").exists()


@pytest.mark.parametrize(("chunk", "layout"), [
    ((0, 10, 10, 10), ChunkLayout(split=10, last_prompt=9, produces=True)),  # the whole prompt at once
    ((0, 4, 10, 10), ChunkLayout(split=4, last_prompt=None, produces=False)),  # chunked prefill
    ((8, 2, 10, 10), ChunkLayout(split=2, last_prompt=1, produces=True)),  # ... its last chunk
    ((10, 1, 10, 11), ChunkLayout(split=0, last_prompt=None, produces=True)),  # a decode step
    # After a preemption with 3 tokens generated, vLLM recomputes all 13 in chunks of 5, 5, 3:
    # only the last chunk produces, and the prompt is not read again.
    ((0, 5, 10, 13), ChunkLayout(split=5, last_prompt=None, produces=False)),
    ((5, 5, 10, 13), ChunkLayout(split=5, last_prompt=None, produces=False)),
    ((10, 3, 10, 13), ChunkLayout(split=0, last_prompt=None, produces=True)),
    ((8, 4, 10, 13), ChunkLayout(split=2, last_prompt=None, produces=False)),  # one across the boundary
])
def test_only_the_chunk_that_reaches_every_token_produces_one(chunk, layout):
    assert chunk_layout(*chunk) == layout


def _steer(**phases: dict[int, float]) -> list:
    """``encode_request``'s steering entries for constant deltas per layer and phase."""
    hidden = 4
    prompt = {layer: torch.full((hidden,), v) for layer, v in phases.get("prompt", {}).items()}
    response = {layer: torch.full((hidden,), v) for layer, v in phases.get("response", {}).items()}
    return encode_request("u", hidden, prompt=prompt, response=response, probes={}, block_above={},
                          response_probes={}, capture_layers=frozenset())["steer"]


def test_the_prefix_cache_salt_keeps_the_prompt_response_layout_of_phase_split_steering():
    everywhere = _steer(prompt={10: 2.0}, response={10: 2.0})
    # Steered alike at every position: a longer follow-up prompt may reuse the earlier turn's blocks.
    assert _salt(everywhere, 40) == _salt(everywhere, 140)
    for split in (_steer(prompt={10: 2.0}), _steer(response={19: 2.0}), _steer(prompt={10: 2.0}, response={10: 1.0})):
        # Resending an answer as prompt must not meet blocks computed under the response's delta.
        assert _salt(split, 40) != _salt(split, 140)
        assert _salt(split, 40) == _salt(split, 40)
        assert _salt(split, 40) != _salt(everywhere, 40)


def test_max_lora_rank_rounds_up_to_a_rank_vllm_accepts():
    assert [_vllm_rank(r) for r in (1, 4, 8, 9, 64, 65, 300, 512, 1000)] == [1, 8, 8, 16, 64, 128, 320, 512, 512]


@pytest.mark.parametrize("switch, on", [({}, False), ({"enable_lora": True}, True),
                                         ({"lora_modules": ["mine=/srv/mine"]}, True)])
def test_vllm_runs_lora_only_when_asked_as_vllm_does(lm, tmp_path, switch, on):
    # LoRA on costs vLLM's base rows its LoRA kernels; off by default, as vLLM's --enable-lora.
    from app.main import make_engine
    from app.settings import Settings

    engine = make_engine(Settings(engine="vllm", data_dir=tmp_path, **switch), lm)  # starts nothing
    assert (engine.max_loras > 0) is on
    assert ("adapters" in engine.unsupported) is not on


def test_an_adapter_reaches_vllm_as_a_private_copy_of_the_one_the_request_was_admitted_with(lm, tmp_path):
    from tests.test_adapters import _make_adapter

    store = tmp_path / "adapters"
    first = _make_adapter(lm, tmp_path / "first", 1, ["q_proj", "v_proj"], 4, lora_alpha=8)
    second = _make_adapter(lm, tmp_path / "second", 2, ["q_proj", "v_proj"], 4, lora_alpha=8)
    shutil.copytree(first, store / "persona")
    admitted = read_adapter(store / "persona", lm, name="persona")
    engine = VLLMEngine(lm, model_dir=tmp_path, adapter_dir=store, max_loras=2)  # starts nothing
    try:
        held = asyncio.run(engine._lora_request(admitted))
        copy = Path(held.lora_path)
        assert held.lora_name != "persona" and copy.parent != store
        assert (copy / "adapter_model.safetensors").read_bytes() == (first / "adapter_model.safetensors").read_bytes()
        # Replaced in the store: the admitted object keeps its copy; a new object gets its own.
        shutil.rmtree(store / "persona")
        shutil.copytree(second, store / "persona")
        assert asyncio.run(engine._lora_request(admitted)) is held
        replaced = read_adapter(store / "persona", lm, name="persona")
        other = asyncio.run(engine._lora_request(replaced))
        assert other.lora_int_id != held.lora_int_id and other.lora_path != held.lora_path
        # A request admitted with the old object whose first use comes after the swap is refused, not
        # served with the new weights.
        stale = read_adapter(first, lm, name="persona")
        with pytest.raises(EngineError, match="replaced"):
            asyncio.run(engine._lora_request(stale))
        # The copy goes when the last holder of its adapter object does.
        del admitted
        gc.collect()
        assert not copy.exists() and Path(other.lora_path).exists()
    finally:
        engine.shutdown()


def test_a_remediation_salts_the_prefix_cache_with_its_deltas_and_the_prompt_length():
    from steering.steer import ConditionalSteering

    def remedy(value: float) -> list:
        c = ConditionalSteering("optimistic", 19, 0, 1.5, {19: torch.full((4,), value)})
        return encode_request("u", 4, prompt={}, response={}, probes={19: torch.ones(1, 4)}, block_above={},
                              response_probes={}, capture_layers=frozenset(), remediations=(c,))["remedy"]

    assert _salt([], 40, remedy(-1.0)) == _salt([], 40, remedy(-1.0))
    assert _salt([], 40, remedy(-1.0)) != _salt([], 40, remedy(-2.0))
    # It steers only generated tokens: an answer resent as prompt must not meet its blocks.
    assert _salt([], 40, remedy(-1.0)) != _salt([], 140, remedy(-1.0))
