"""Extraction's own steps on the default model: the coefficient sweep's fluency signal (the
``contrastive_prompts`` method runs end to end in tests/test_extract_api.py)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from steering.extract import (
    MAX_PERPLEXITY_RATIO,
    DefinitionError,
    Samples,
    TraitDefinition,
    coefficient_sweep,
    combine_directions,
    extraction_choices,
    recommend_range,
    smooth_layers,
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


def _paired(direction: torch.Tensor, n: int = 12, layers: int = 3, seed: int = 0) -> Samples:
    """Paired samples whose differences lie along ``direction`` (varying length) plus small noise."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, layers, direction.numel(), generator=g)
    scale = torch.linspace(0.5, 2.0, n).reshape(n, 1, 1)
    noise = 0.05 * torch.randn(n, layers, direction.numel(), generator=g)
    return Samples(pos=base + scale * direction + noise, neg=base, paired=True, counts={})


def test_pca_of_paired_differences_finds_their_axis_and_points_with_the_mean():
    axis = torch.tensor([3.0, 4.0, 0.0, 0.0])
    samples = _paired(axis)
    mean = combine_directions(samples, "mean")
    pca = combine_directions(samples, "pca")
    unit = axis / axis.norm()
    for layer in range(3):
        assert float(pca[layer] @ unit) / float(pca[layer].norm()) > 0.999
        assert abs(float(pca[layer] @ unit) - float(mean[layer] @ unit)) < 1e-3 * float(mean[layer].norm())
    flipped = combine_directions(Samples(samples.neg, samples.pos, True, {}), "pca")
    assert float(flipped[1] @ unit) < 0  # the sign follows the mean difference, not the SVD
    with pytest.raises(ValueError, match="paired"):
        combine_directions(Samples(samples.pos, samples.neg, False, {}), "pca")


def test_smoothing_averages_neighbouring_layers_and_leaves_the_embeddings():
    d = torch.arange(5, dtype=torch.float32).reshape(5, 1).repeat(1, 2)  # layer k holds k
    s = smooth_layers(d, 1)
    assert s[:, 0].tolist() == [0.0, 1.5, 2.0, 3.0, 3.5]
    assert smooth_layers(d, 0) is d


def test_a_definitions_extraction_object_sets_the_choices_and_names_its_bad_fields():
    trait = TraitDefinition.load(REPO_VECTORS / "traits" / "evil.json")
    trait.extraction = {"method": "contrastive_texts", "combine": "pca", "smooth_layers": 1, "layer": 12, "chosen_by": "x"}
    assert extraction_choices(trait) == {"method": "contrastive_texts", "combine": "pca", "smooth_layers": 1, "layer": 12}
    # Another method than the definition's: none of its other choices carry over.
    assert extraction_choices(trait, "labelled_sentences") == {"method": "labelled_sentences", "combine": "mean",
                                                                "smooth_layers": 0, "layer": None}
    # A layer chosen on one model is not used on another; naming the method it names changes nothing.
    trait.extraction["model"] = "SmolLM2-135M-Instruct"
    assert extraction_choices(trait, None, "SmolLM2-135M-Instruct")["layer"] == 12
    assert extraction_choices(trait, "contrastive_texts", "some-other-model") == {
        "method": "contrastive_texts", "combine": "pca", "smooth_layers": 1, "layer": None}
    # Without a method of its own, the definition's choices belong to the default method.
    trait.extraction = {"combine": "pca", "layer": 9}
    assert extraction_choices(trait, "contrastive_texts")["layer"] == 9
    bad = [({"method": "nope"}, "trait.extraction.method"),
           ({"method": "labelled_sentences", "combine": "pca"}, "trait.extraction.combine"),
           ({"smooth_layers": 9}, "trait.extraction.smooth_layers"),
           ({"layer": True}, "trait.extraction.layer"),
           ({"layers": 3}, "trait.extraction"),
           ([1], "trait.extraction")]
    for spec, param in bad + [({"method": "contrastive_prompts", "smooth_layers": -1}, "trait.extraction.smooth_layers"),
                              ({"model": 7}, "trait.extraction.model")]:
        trait.extraction = spec
        for method in (None, "labelled_sentences"):  # refused whichever method is asked for
            with pytest.raises(DefinitionError) as info:
                extraction_choices(trait, method)
            assert info.value.param == param, spec
