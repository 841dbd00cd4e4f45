"""Bench row R7 (issue 28, "How fast"): LoRA adapters served per request in the same continuous
batch as base rows and steering, against the same load with no adapters, side by side in one run.

Workload: R3's 32 prompts, 64 new tokens each, EOS ignored, greedy, R3's mixed steering; request
i runs with adapter i % 5 (four adapters and the base model, each on a fifth of the rows). The
adapters are LoRA on all seven projections of every block, random A and B, at the rank of this
project's fine-tuning (``steering.finetune``: r 32) and of its shipped adapters (r 4).
"""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from safetensors.torch import save

from steering.adapters import PARTS, _target_table, parse_adapter
from steering.engine import Engine
from steering.model import load_model
from steering.registry import VectorRegistry
from steering.steer import resolve_steering
from tests.bench.test_engine_bench import REPS, N, engine_run, prompts, specs_for
from tests.conftest import CACHE_DIR, REPO_VECTORS

RANKS = (32, 4)
ADAPTERS = 4


@pytest.fixture(scope="module")
def lm():
    return load_model("default", dtype="float32", device="cpu", cache_dir=CACHE_DIR)


def random_adapter(lm, name: str, rank: int, seed: int):
    """A PEFT LoRA adapter (its two files' bytes, parsed as an upload is) on every projection."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (_layer, _part, linear) in _target_table(lm).items():
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(rank, linear.in_features, generator=generator) / linear.in_features ** 0.5
        tensors[f"{key}.lora_B.weight"] = torch.randn(linear.out_features, rank, generator=generator) * 0.01
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(PARTS)}
    return parse_adapter(name, json.dumps(config).encode(), save(tensors), lm, max_rank=rank)


def run(engine: Engine, ids: list[list[int]], steering: list, adapters: list) -> float:
    """Output tokens/s of all rows submitted at once, each with its steering and adapter."""
    return engine_run(engine, ids, steering, adapters=adapters)


@pytest.mark.timeout(3600)  # a loaded 2-core machine: minutes per repetition
def test_r7_adapters_in_the_batch(lm, record, tmp_path):
    registry = VectorRegistry(tmp_path / "reg", model_name=lm.name, fingerprint=lm.fingerprint,
                              num_layers=lm.num_layers, hidden_size=lm.hidden_size)
    registry.seed_from(REPO_VECTORS)
    vectors = registry.names()
    ids = prompts(lm)
    rows = [resolve_steering(specs_for(i, vectors), registry) if specs_for(i, vectors) else None for i in range(N)]
    per_rank = {}
    for rank in RANKS:
        loaded = [random_adapter(lm, f"bench-{rank}-{k}", rank, seed=k) for k in range(ADAPTERS)]
        per_rank[rank] = [loaded[i % (ADAPTERS + 1)] if i % (ADAPTERS + 1) < ADAPTERS else None for i in range(N)]
    engine = Engine(lm, max_batch_size=64)
    engine.start()
    try:
        run(engine, ids[:5], rows[:5], per_rank[RANKS[0]][:5])  # warm-up
        plain, mixed = [], {rank: [] for rank in RANKS}
        for rep in range(REPS):  # interleaved, so drift hits both alike
            plain.append(run(engine, ids, rows, [None] * N))
            for rank in RANKS:
                mixed[rank].append(run(engine, ids, rows, per_rank[rank]))
            print(f"R7 repetition {rep + 1}/{REPS}: no adapters {plain[-1]:.1f} tok/s, "
                  + ", ".join(f"rank {r} {mixed[r][-1]:.1f}" for r in RANKS), flush=True)
    finally:
        engine.shutdown()
    base = statistics.median(plain)
    for rank in RANKS:
        ratio = statistics.median(mixed[rank]) / base
        record({"row": "R7", "lora_rank": rank, "adapters": ADAPTERS, "adapter_rows": sum(a is not None for a in per_rank[rank]),
                "with_adapters_tok_s": round(statistics.median(mixed[rank]), 1), "no_adapters_tok_s": round(base, 1),
                "ratio": round(ratio, 3), "target": ">= 0.85"})
    assert statistics.median(mixed[RANKS[0]]) / base >= 0.85
