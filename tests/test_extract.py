"""Extraction's own steps on the default model: the coefficient sweep's fluency signal (the
``contrastive_prompts`` method runs end to end in tests/test_extract_api.py)."""

from __future__ import annotations

import asyncio

import pytest

from steering.extract import (
    MAX_PERPLEXITY_RATIO,
    TraitDefinition,
    coefficient_sweep,
    recommend_range,
)
from steering.vector import PersonaVector
from tests.conftest import REPO_VECTORS


def _shipped(name: str) -> PersonaVector:
    return PersonaVector.load(REPO_VECTORS / "SmolLM2-135M-Instruct" / f"{name}.safetensors")


def test_sweep_fluency_is_the_unsteered_models_perplexity_and_caps_the_range(lm, runner):
    """Pushed far along `evil`, the 135M model writes broken text ("Itselfreselfrespper...");
    the unsteered model finds it far more perplexing than its own answers, so the recommended
    range stops below that coefficient."""
    vector = _shipped("evil")
    questions = TraitDefinition.load(REPO_VECTORS / "traits" / "evil.json").heldout_questions[:3]
    sweep = asyncio.run(coefficient_sweep(runner, lm.tokenizer, vector.directions, vector.recommended_layer,
                                          questions, grid=(1.0, 10.0)))
    print("sweep:", sweep)
    by_c = {row["coefficient"]: row for row in sweep}
    assert set(by_c) == {-10.0, -1.0, 0.0, 1.0, 10.0}
    assert all(row["perplexity"] >= 1.0 for row in sweep)
    assert by_c[0.0]["perplexity"] < by_c[1.0]["perplexity"] < by_c[10.0]["perplexity"]
    assert by_c[10.0]["perplexity"] > MAX_PERPLEXITY_RATIO * by_c[0.0]["perplexity"]
    assert by_c[1.0]["projection"] > by_c[0.0]["projection"] > by_c[-1.0]["projection"]
    lo, hi = recommend_range(sweep, float(vector.stats["neutral_std"][vector.recommended_layer]))
    assert hi == 1.0 and lo <= hi
