"""Evidence run for the README (slow, `make bench`): the default model's MBTI type and Big
Five scores with their reliability, and the matrix of shifts when each axis / factor vector
is steered at -c and +c."""

from __future__ import annotations

import asyncio
import os

import pytest

from steering.assess import Inventory, assess
from steering.engine import Engine
from steering.model import load_model
from steering.registry import VectorRegistry
from steering.steer import SteeringSpec, resolve_steering
from tests.conftest import CACHE_DIR, REPO_VECTORS

# Prompts run at about 10 per second on a 2-core CPU: enough repetitions for a stable kappa,
# fewer for the steering matrix (PERSONA_ASSESS_REPS / PERSONA_MATRIX_REPS raise them).
REPS = int(os.environ.get("PERSONA_ASSESS_REPS", "10"))
MATRIX_REPS = int(os.environ.get("PERSONA_MATRIX_REPS", "2"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    lm = load_model("default", dtype="float32", device="cpu", cache_dir=CACHE_DIR)
    reg = VectorRegistry(tmp_path_factory.mktemp("reg"), model_name=lm.name, fingerprint=lm.fingerprint,
                         num_layers=lm.num_layers, hidden_size=lm.hidden_size)
    reg.seed_from(REPO_VECTORS)
    engine = Engine(lm, max_batch_size=64, max_waiting=1 << 20)
    engine.start()
    yield engine, reg
    engine.shutdown()


def _matrix(engine, reg, inventory, vectors, read, reps):
    rows = {}
    for target, name in vectors:
        c = 2 * reg.get(name).coefficient_range[0]
        low = asyncio.run(assess(engine, inventory, repetitions=reps, steering=resolve_steering([SteeringSpec(name, -c)], reg)))
        high = asyncio.run(assess(engine, inventory, repetitions=reps, steering=resolve_steering([SteeringSpec(name, c)], reg)))
        rows[target] = {"c": c, **{k: round(read(high, k) - read(low, k), 3) for k in [t for t, _ in vectors]}}
    return rows


def test_mbti_report(setup, record):
    engine, reg = setup
    inv = Inventory.load(REPO_VECTORS / "inventories" / "mbti.json")
    base = asyncio.run(assess(engine, inv, repetitions=REPS))
    record({"row": "mbti", "type": base["type"], "repetitions": REPS,
            **{d: {"share": v["share"], "mean_probability": v["mean_probability"], "kappa": v["kappa"],
                   "kappa_at": {p["repetitions"]: p["kappa"] for p in v["kappa_curve"] if p["repetitions"] in (2, 5, 10, 20, 30)}}
               for d, v in base["dimensions"].items()}})
    axes = [(a, f"mbti.{a}") for a in ("E-I", "S-N", "T-F", "J-P")]
    matrix = _matrix(engine, reg, inv, axes, lambda r, d: r["dimensions"][d]["mean_probability"][d.split("-")[0]], MATRIX_REPS)
    record({"row": "mbti_shift_matrix", "read": f"mean probability of the first pole, +2c minus -2c, {MATRIX_REPS} repetitions",
            "matrix": matrix})


def test_big5_report(setup, record):
    engine, reg = setup
    inv = Inventory.load(REPO_VECTORS / "inventories" / "big5.json")
    base = asyncio.run(assess(engine, inv, repetitions=REPS))
    record({"row": "big5", "repetitions": REPS, **{f: {"score": v["score"], "kappa": v["kappa"]} for f, v in base["factors"].items()}})
    factors = [(f, f"big5.{f}") for f in inv.dimensions]
    matrix = _matrix(engine, reg, inv, factors, lambda r, f: r["factors"][f]["score"], MATRIX_REPS)
    record({"row": "big5_shift_matrix", "read": f"keyed score (1-5), +2c minus -2c, {MATRIX_REPS} repetitions", "matrix": matrix})
