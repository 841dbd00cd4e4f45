"""``make evidence``: its statistics, its held-out data, and a recomputed subset of its table on
the default model."""

from __future__ import annotations

import asyncio
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from steering.chat import chat_prompt_ids
from steering.evidence import Lexicon, check_held_out, load_evidence, measure, pearson
from steering.extract import auroc, unit_rows
from steering.monitor import scalar_projection
from steering.vector import PersonaVector
from tests.conftest import REPO_VECTORS

EVIDENCE = load_evidence(REPO_VECTORS / "evidence.json")
TABLE = Path(__file__).resolve().parents[1] / "docs" / "evidence" / "SmolLM2-135M-Instruct.json"


def _vector(name: str) -> PersonaVector:
    return PersonaVector.load(REPO_VECTORS / "SmolLM2-135M-Instruct" / f"{name}.safetensors")


def test_pearson_agrees_with_numpy_and_refuses_constant_samples():
    rng = random.Random(7)
    for _ in range(5):
        x = [rng.gauss(0, 1) for _ in range(40)]
        y = [a * rng.uniform(-2, 2) + rng.gauss(0, 1) for a in x]
        assert pearson(x, y) == pytest.approx(float(np.corrcoef(x, y)[0, 1]), abs=1e-12)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 2, 3], [5, 5, 5]) is None
    with pytest.raises(ValueError):
        pearson([1, 2], [1])


def test_auroc_on_a_hand_worked_case():
    # Pairs (pos, neg): (3,1) win, (3,2) win, (2,1) win, (2,2) tie -> 3.5 / 4.
    assert auroc([3, 2], [1, 2]) == 0.875
    assert auroc([1], [2]) == 0.0


def test_lexicon_counts_words_phrases_and_marks_per_hundred_words():
    lexicon = Lexicon(pos=["good", "looking forward", "!"], neg=["bad"], fit="test")
    # 8 words; hits: good, looking forward, "!" x2 (pos 4) and bad (neg 1), not "goodness".
    assert lexicon.score("Good goodness! Looking forward to it, not bad!") == pytest.approx(100 * 3 / 8)
    assert lexicon.score("") == 0.0


def test_every_shipped_vector_has_held_out_graded_prompts():
    shipped = {p.stem for p in (REPO_VECTORS / "SmolLM2-135M-Instruct").glob("*.safetensors")}
    assert set(EVIDENCE) == shipped
    for name, evidence in EVIDENCE.items():
        assert sorted(evidence.system) == [-2, -1, 0, 1, 2]
        assert len(set(evidence.system.values())) == 5
        assert len(evidence.questions) >= 20
        definition = json.loads((REPO_VECTORS / "traits" / f"{name}.json").read_text())
        check_held_out(evidence, definition)
    leaked = json.loads((REPO_VECTORS / "traits" / "evil.json").read_text())
    leaked["heldout_questions"].append(EVIDENCE["evil"].questions[3])
    with pytest.raises(ValueError, match="shares text"):
        check_held_out(EVIDENCE["evil"], leaked)


def test_evil_monitor_recomputed_on_a_subset(lm, runner):
    """Three levels x three questions of the `evil` row: the last-prompt projection rises with
    the system prompt's level, predicts the answers' own projection, matches the monitor's
    projection of the same state, and matches the stored table point for point."""
    vector = _vector("evil")
    result = asyncio.run(measure(runner, lm.tokenizer, vector, EVIDENCE["evil"], levels=(-2, 0, 2), questions=3))
    print({k: result[k] for k in ("r_response", "r_lexicon", "r_level", "auroc")}, result["per_level"])
    assert result["n"] == 9 and result["layer"] == vector.recommended_layer
    by_level = {int(k): v["prompt_projection"] for k, v in result["per_level"].items()}
    assert by_level[-2] < by_level[0] < by_level[2]
    assert result["auroc"] == 1.0
    assert result["r_response"] > 0.3

    points = result["points"]
    xs = [p["prompt_projection"] for p in points]
    assert result["r_response"] == pytest.approx(float(np.corrcoef(xs, [p["response_projection"] for p in points])[0, 1]))

    # The layer comparison reads the same prompts through the engine's all-layer capture: at the
    # recommended layer it must agree with the probes' scores on the questions it holds out.
    choice = result["layer_choice"]
    assert math.floor(0.3 * lm.num_layers) <= choice["picked_layer"] <= math.ceil(0.75 * lm.num_layers)
    assert choice["questions_picking"] == 1 and choice["questions_scoring"] == 2
    scored = EVIDENCE["evil"].questions[choice["questions_picking"]:3]
    assert choice["recommended_auroc"] == auroc(
        [p["prompt_projection"] for p in points if p["level"] > 0 and p["question"] in scored],
        [p["prompt_projection"] for p in points if p["level"] < 0 and p["question"] in scored])

    first = points[0]
    ids = chat_prompt_ids(lm.tokenizer, EVIDENCE["evil"].messages(first["level"], first["question"]))
    state = asyncio.run(runner.last_states([ids], [vector.recommended_layer]))[0, 0]
    assert first["prompt_projection"] == pytest.approx(scalar_projection(state, vector.directions[vector.recommended_layer]),
                                                       abs=1e-3)
    assert first["prompt_projection"] == pytest.approx(float(state @ unit_rows(vector.directions)[vector.recommended_layer]),
                                                       abs=1e-3)

    stored = {(p["level"], p["question"]): p for p in next(r for r in json.loads(TABLE.read_text())["results"]
                                                             if r["vector"] == "evil")["points"]}
    for p in points:
        assert p["prompt_projection"] == pytest.approx(stored[(p["level"], p["question"])]["prompt_projection"], abs=1e-3)
        assert p["answer"] == stored[(p["level"], p["question"])]["answer"]
