"""The vLLM backend's own pieces that run without starting vLLM: the CLI's check that it is
installed, which scheduled tokens of a forward pass produce a token (preemption recomputes),
and the prefix-cache salt. The backend itself is exercised in tests/test_engine_contract.py."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
import torch

from steering.vllm_engine import _salt
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
