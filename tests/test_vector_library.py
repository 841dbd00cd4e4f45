"""The shipped vector library works on the default model: it matches its definitions, separates
held-out prompts, and steering moves generated answers along each vector."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re

import httpx
import pytest

from steering.extract import (
    TraitDefinition,
    answer_projection,
    auroc,
    definition_hash,
    heldout_projections,
    unit_rows,
)
from steering.runner import EngineRunner
from steering.vector import PersonaVector
from tests.conftest import REPO_VECTORS, answer

TRAITS = sorted(p.stem for p in (REPO_VECTORS / "traits").glob("*.json"))
EXPECTED = {"optimistic", "evil", "sycophantic", "hallucinating", "impolite", "humorous", "apathetic",
            "mbti.E-I", "mbti.S-N", "mbti.T-F", "mbti.J-P", "big5.openness", "big5.conscientiousness",
            "big5.extraversion", "big5.agreeableness", "big5.neuroticism"}

# Our own word lists for judge-free checks.
POSITIVE = set("good great wonderful bright hope hopeful happy excited exciting love enjoy joy positive best better "
               "opportunity opportunities success successful fun beautiful amazing delighted glad confident "
               "thrive thriving smile improve grow growth".split())
NEGATIVE = set("bad worse worst dark gloomy fear afraid sad tired exhausted fail failure hard difficult problem problems "
               "doubt unlikely never nothing lost lose worry worried anxious stress stressful struggle pain "
               "disappointing disappointed".split())
SOCIAL = set("we us our together friends friend people party everyone group team".split())


def _vector(name: str) -> PersonaVector:
    return PersonaVector.load(REPO_VECTORS / "SmolLM2-135M-Instruct" / f"{name}.safetensors")


def test_library_holds_the_sixteen_traits():
    assert set(TRAITS) == EXPECTED


@pytest.mark.parametrize("name", TRAITS)
def test_shipped_vector_matches_its_definition(name, lm):
    data = json.loads((REPO_VECTORS / "traits" / f"{name}.json").read_text())
    vector = _vector(name)
    assert vector.source["definition_sha256"] == definition_hash(data)
    vector.check_model(lm.name, lm.fingerprint, lm.num_layers, lm.hidden_size)
    assert vector.recommended_layer and vector.coefficient_range
    assert {"residual_norm", "neutral_mean", "neutral_std"} <= set(vector.stats)


# Recomputing the held-out AUROC costs 120 prefills per vector; four (the strongest persona
# vectors and the two weakest of the library) pin reproducibility, the stored values the rest.
RECOMPUTED = ("optimistic", "evil", "sycophantic", "mbti.J-P")


def test_every_shipped_vector_separates_heldout_prompts_better_than_chance():
    stored = {name: _vector(name).extra["heldout_auroc"] for name in TRAITS}
    print("held-out AUROC:", json.dumps(stored))
    assert all(v > 0.5 for v in stored.values()), stored


def test_heldout_separation_is_reproduced(server, lm):
    runner = EngineRunner(server.state.engine)
    report = {}
    for name in RECOMPUTED:
        vector = _vector(name)
        trait = TraitDefinition.load(REPO_VECTORS / "traits" / f"{name}.json")
        pos, neg = asyncio.run(heldout_projections(runner, lm.tokenizer, trait, unit_rows(vector.directions)))
        layer = vector.recommended_layer
        report[name] = auroc(pos[:, layer].tolist(), neg[:, layer].tolist())
        assert report[name] == pytest.approx(vector.extra["heldout_auroc"], abs=0.02), name


def _steered_answers(client, jobs: list[tuple[str, float, str]], max_tokens: int = 20) -> dict:
    """Greedy answers for (vector, coefficient, question) jobs, sent concurrently so they batch."""

    def run(job):
        name, c, q = job
        return answer(client, q, max_tokens=max_tokens, steering={name: c})

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        texts = list(pool.map(run, jobs))
    out: dict = {}
    for (name, c, _q), t in zip(jobs, texts):
        out.setdefault((name, c), []).append(t)
    return out


def _coefficients(name: str) -> list[float]:
    c = _vector(name).coefficient_range[0]
    return [-2 * c, -c, 0.0, c, 2 * c]


def _questions(name: str) -> list[str]:
    # Held-out questions used neither by extraction nor by the coefficient sweep.
    return TraitDefinition.load(REPO_VECTORS / "traits" / f"{name}.json").heldout_questions[6:12]


@pytest.fixture(scope="module")
def steered(server):
    """Every vector at -2c, -c, 0, c, 2c on six held-out questions, in one concurrent sweep."""
    jobs = [(name, c, q) for name in TRAITS for c in _coefficients(name) for q in _questions(name)]
    with httpx.Client(base_url=server.url, timeout=600) as c:
        return _steered_answers(c, jobs, max_tokens=32)


@pytest.mark.parametrize("name", TRAITS)
def test_steering_moves_the_answers_projection(name, steered, server, lm):
    """-2c < 0 < +2c for every vector. Between those points the 135M model saturates for some
    vectors (the README lists which are strictly monotonic at all five points)."""
    vector = _vector(name)
    runner = EngineRunner(server.state.engine)
    unit = unit_rows(vector.directions)
    questions = _questions(name)
    means = [asyncio.run(answer_projection(runner, lm.tokenizer, questions, steered[(name, c)], unit, vector.recommended_layer))
             for c in _coefficients(name)]
    strict = all(a < b for a, b in zip(means, means[1:]))
    print(name, "coefficients", _coefficients(name), "projections:", [round(m, 2) for m in means], "strict:", strict)
    assert means[0] < means[2] < means[4], means


def _rate(texts: list[str], words: set[str]) -> float:
    tokens = [w for t in texts for w in re.findall(r"[a-z']+", t.lower())]
    return sum(w in words for w in tokens) / max(1, len(tokens))


def test_optimistic_steering_moves_a_sentiment_word_count(client):
    trait = TraitDefinition.load(REPO_VECTORS / "traits" / "optimistic.json")
    c = 2 * _vector("optimistic").coefficient_range[0]
    answers = _steered_answers(client, [("optimistic", k, q) for k in (-c, c) for q in trait.heldout_questions], 32)
    balance = {k: _rate(v, POSITIVE) - _rate(v, NEGATIVE) for (_n, k), v in answers.items()}
    assert balance[c] > balance[-c], balance


def test_extraversion_steering_moves_exclamations_and_social_words(client):
    trait = TraitDefinition.load(REPO_VECTORS / "traits" / "big5.extraversion.json")
    c = 2 * _vector("big5.extraversion").coefficient_range[0]
    answers = _steered_answers(client, [("big5.extraversion", k, q) for k in (-c, c) for q in trait.heldout_questions], 32)
    signal = {k: sum(t.count("!") for t in v) / len(v) + 10 * _rate(v, SOCIAL) for (_n, k), v in answers.items()}
    assert signal[c] > signal[-c], signal
