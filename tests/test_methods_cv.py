"""`make methods` chooses by cross-validation over question folds, among candidates that steer,
and ships a new build only where it beats the previous one on folds neither was chosen on.
Synthetic fold scores: no model."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch

from steering.extract import DefinitionError, TraitDefinition, extraction_choices
from steering.methods import (FIRST_HALF_CHOSEN_BY, Folds, choose, cross_validate, extraction_spec, fold_aurocs,
                              build_steers, moves, ship_decision, steers_in)
from tests.conftest import REPO_VECTORS


def _all_steer(checked: list[int]):
    async def steers(k: int) -> bool:
        checked.append(k)
        return True
    return steers


def test_a_candidate_that_wins_one_fold_by_overfitting_loses_under_cross_validation():
    # Candidate 0 is perfect on fold 0 (the old rule's choosing half) and at chance elsewhere;
    # candidate 1 is good on every fold.
    scores = torch.tensor([[1.00, 0.50, 0.45, 0.50, 0.55, 0.50],
                           [0.85, 0.80, 0.82, 0.79, 0.81, 0.80]])
    assert asyncio.run(choose(scores, [0], _all_steer([]))) == 0  # chosen on one fold, it wins
    cv = asyncio.run(cross_validate(scores, _all_steer([])))
    assert cv["chosen"] == 1
    assert cv["picks"] == [1] * 6  # even leaving fold 0 in the training folds
    assert cv["held_out"] == pytest.approx(scores[1].tolist())


def test_nested_scores_come_from_a_choice_that_did_not_see_the_fold():
    # Candidate 0 wins on average only because of fold 2; with fold 2 left out, 1 is chosen.
    scores = torch.tensor([[0.70, 0.70, 1.00],
                           [0.72, 0.72, 0.50]])
    cv = asyncio.run(cross_validate(scores, _all_steer([])))
    assert cv["chosen"] == 0
    assert cv["picks"] == [0, 0, 1]
    assert cv["held_out"] == pytest.approx([0.70, 0.70, 0.50])


def test_a_candidate_that_does_not_steer_is_rejected_and_checks_stop_at_the_first_that_does():
    scores = torch.tensor([[0.95, 0.95, 0.95],   # best, does not steer
                           [0.60, 0.60, 0.60],
                           [0.90, 0.90, 0.90],   # second best, steers
                           [0.50, 0.50, 0.50]])
    checked: list[int] = []

    async def steers(k: int) -> bool:
        checked.append(k)
        return k != 0

    assert asyncio.run(choose(scores, [0, 1, 2], steers)) == 2
    assert checked == [0, 2]

    async def never(_k: int) -> bool:
        return False

    cv = asyncio.run(cross_validate(scores, never))
    assert cv["chosen"] is None and cv["held_out"] == [None] * 3
    assert ship_decision(cv["held_out"], [0.7, 0.7, 0.7], [0, 1, 2])["ship"] is False


def test_steering_means_the_projection_rises_from_minus_2c_to_plus_2c():
    sweep = [{"coefficient": c, "projection": p} for c, p in
             [(-2.0, -3.0), (-1.0, -1.0), (0.0, 0.0), (1.0, 1.0), (2.0, 2.5)]]
    assert steers_in(sweep, 1.0)
    flat = [{**r, "projection": -62.92} for r in sweep]  # mbti.J-P's PCA candidate, 2026-11-25
    assert not steers_in(flat, 1.0)
    falls = [{**r, "projection": {-2.0: -10.83, 0.0: -9.71, 2.0: -10.07}.get(r["coefficient"], 0.0)} for r in sweep]
    assert not steers_in(falls, 1.0)  # hallucinating's, 2026-11-25


def test_a_sweep_that_hardly_moves_the_projection_does_not_steer_even_where_it_rises():
    # hallucinating's layer-9 candidate, 2026-12-06: it rises at c = 0.5 (the fallback lower end,
    # since no coefficient moves the projection by half a neutral std) by 0.3 over 2 units.
    points = [(-4.0, -9.5941), (-2.0, -10.8334), (-1.0, -10.776), (-0.5, -10.1539), (0.0, -9.7139), (0.5, -9.6421), (1.0, -9.4255),
              (2.0, -10.0664), (4.0, -10.4119)]
    sweep = [{"coefficient": c, "projection": p} for c, p in points]
    assert steers_in(sweep, 0.5)
    assert not moves(sweep, neutral_std=1.0)
    assert moves(sweep, neutral_std=0.5)
    strong = [{**r, "projection": 3.0 * r["coefficient"]} for r in sweep]
    assert moves(strong, neutral_std=1.0) and steers_in(strong, 0.5)
    # What would ship is checked again on its own sweep and range: the same candidate built, with
    # the range's lower end at 1, falls from 0 to +2.
    built = SimpleNamespace(extra={"coefficient_sweep": sweep}, coefficient_range=(1.0, 6.0))
    assert not build_steers(built)
    assert build_steers(SimpleNamespace(extra={"coefficient_sweep": strong}, coefficient_range=(1.0, 6.0)))
    assert build_steers(SimpleNamespace(extra={"coefficient_sweep": strong}, coefficient_range=(4.0, 6.0)))  # no +-8: +-4


def test_the_previous_build_is_kept_unless_the_new_choice_beats_it_on_folds_neither_saw():
    held_out = [0.90, 0.90, 0.90, 0.70, 0.72, 0.71]
    previous = [0.95, 0.95, 0.95, 0.75, 0.76, 0.74]  # chosen on folds 0-2, strong there
    keep = ship_decision(held_out, previous, [3, 4, 5])
    assert keep["ship"] is False and keep["folds"] == [3, 4, 5]
    assert keep["new"] == pytest.approx(0.71) and keep["previous"] == pytest.approx(0.75)
    # On the choosing folds the new build looks worse, on the unseen ones it is better: ship.
    assert ship_decision(held_out, [0.95, 0.95, 0.95, 0.60, 0.62, 0.61], [3, 4, 5])["ship"] is True
    assert ship_decision(held_out, previous, [])["ship"] is False  # nothing to compare on
    assert ship_decision(held_out, None, [])["ship"] is True  # nothing shipped before
    assert ship_decision(held_out, held_out, [3, 4, 5])["ship"] is False  # a tie keeps the previous


def test_folds_keep_question_order_and_know_what_chose_a_build():
    folds = Folds.split(20, 12)  # sycophantic: 20 evidence questions, 12 held-out questions
    assert folds.count == 9
    assert folds.evidence[:10] == (0, 0, 0, 0, 1, 1, 1, 2, 2, 2)  # the first half fills folds 0-2
    assert set(folds.evidence[10:]) == {3, 4, 5}
    assert folds.definition == (6,) * 4 + (7,) * 4 + (8,) * 4
    assert folds.unseen({"chosen_by": FIRST_HALF_CHOSEN_BY, "layer": 14}) == [3, 4, 5]
    assert folds.unseen({}) == [0, 1, 2, 3, 4, 5]  # the layer by Cohen's d on the definition's questions
    assert folds.unseen({"layer": 14}) == []
    spec = extraction_spec({"chosen": {"method": "contrastive_texts", "combine": "mean", "smooth_layers": 0, "layer": 16},
                            "folds": {"evidence": list(folds.evidence), "definition": list(folds.definition)}}, "m")
    assert folds.unseen(spec) == []
    # Questions added later fall in later folds, unseen by a build chosen before they were added.
    assert Folds.split(24, 12).unseen(spec) == [5]


def test_fold_aurocs_match_the_plain_auroc_per_fold():
    proj = torch.tensor([[2.0, 0.0], [1.0, 1.0], [1.0, 5.0], [0.0, 1.0], [3.0, 3.0], [3.0, 2.0]])
    positive = torch.tensor([True, False, False, True, True, False])
    fold = torch.tensor([0, 0, 0, 1, 1, 1])
    out = fold_aurocs(proj, positive, fold, 2)
    assert out[:, 0].tolist() == [1.0, 0.25]  # fold 1: 0 < 3 loses, 3 == 3 ties
    assert out[:, 1].tolist() == [0.0, 0.5]


def test_definitions_record_what_chose_them_and_refuse_a_malformed_record():
    trait = TraitDefinition.load(REPO_VECTORS / "traits" / "evil.json")
    trait.extraction = {"method": "contrastive_texts", "layer": 12,
                        "chosen_on": {"evidence_questions": 24, "heldout_questions": 12}}
    assert extraction_choices(trait)["layer"] == 12
    trait.extraction["chosen_on"] = {"evidence_questions": -1, "heldout_questions": 12}
    with pytest.raises(DefinitionError) as err:
        extraction_choices(trait)
    assert err.value.param == "trait.extraction.chosen_on"


def test_method_comparison_on_the_model_scores_folds_and_ships_only_candidates_that_steer(lm, runner):
    """`make methods` on a trimmed `evil` definition (2 system-prompt pairs, 2 questions, 2 held-out
    questions) and 4 evidence questions: every candidate's fold AUROCs are the plain AUROC of its
    projections, the choice and every nested pick passed the steering check, and the decision
    compares with the shipped build on the folds it was not chosen on."""
    import json
    from dataclasses import replace

    from steering.chat import chat_prompt_ids
    from steering.evidence import load_evidence
    from steering.extract import auroc, combine_directions, smooth_layers
    from steering.methods import CANDIDATES, FIRST_HALF_CHOSEN_BY, compare, layer_window
    from steering.vector import PersonaVector

    full = TraitDefinition.load(REPO_VECTORS / "traits" / "evil.json")
    # The shipped build's record is whatever rule built it last; this one says the rule before
    # chose it on the first half of the evidence questions, so the later half is left to compare on.
    record = {k: v for k, v in full.extraction.items() if k != "chosen_on"} | {"chosen_by": FIRST_HALF_CHOSEN_BY}
    trait = replace(full, pairs=full.pairs[:2], questions=full.questions[:2], heldout_questions=full.heldout_questions[:2],
                    texts=full.texts[:4], sentences={k: v[:4] for k, v in full.sentences.items()}, extraction=record)
    evidence = load_evidence(REPO_VECTORS / "evidence.json")["evil"]
    evidence = replace(evidence, questions=evidence.questions[:4])
    neutral = json.loads((REPO_VECTORS / "neutral_prompts.json").read_text())["prompts"][:8]
    shipped = PersonaVector.load(REPO_VECTORS / "SmolLM2-135M-Instruct" / "evil.safetensors")
    result = asyncio.run(compare(runner, lm.tokenizer, trait, evidence, lm.num_layers, shipped, neutral_prompts=neutral))
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}))

    assert [(r["method"], r["combine"], r["smooth_layers"]) for r in result["rows"]] == list(CANDIDATES)
    assert result["folds"] == {"evidence": [0, 1, 2, 3], "definition": [4, 5]}
    steered = [{k: c[k] for k in ("method", "combine", "smooth_layers", "layer")} for c in result["steering_checks"]
               if c["steers"]]
    assert result["chosen"] in steered and all(p in steered for p in result["nested"]["picks"])
    assert result["chosen"]["layer"] in layer_window(lm.num_layers)
    for check in result["steering_checks"]:
        rises = check["projection"][0] < check["projection"][1] < check["projection"][2]
        assert (check["moves"] and rises) == check["steers"]
    # evil's prompts are ones this model follows: the fold left out is told apart as well
    assert result["nested"]["all"]["mean"] >= 0.8
    unseen = result["previous"]["unseen_folds"]
    assert unseen == [2, 3]  # the later half of the evidence questions; every held-out question chose it
    decision = result["decision"]
    assert decision["folds"] == unseen
    assert decision["new"] == pytest.approx(sum(result["nested"]["auroc"][f] for f in unseen) / len(unseen), abs=1e-3)
    assert decision["previous"] == pytest.approx(
        sum(result["previous"]["fold_auroc"][f] for f in unseen) / len(unseen), abs=1e-3)
    assert decision["ship"] == (decision["new"] > decision["previous"])

    # The texts / mean / no-smoothing row at its layer, fold by fold, recomputed by hand.
    row = result["rows"][0]
    unit = smooth_layers(combine_directions(result["samples"]["contrastive_texts"], "mean"), 0)[row["layer"]]
    unit = unit / unit.norm()
    per_fold = []
    for q in evidence.questions:
        ids = [chat_prompt_ids(lm.tokenizer, evidence.messages(level, q)) for level in (1, 2, -1, -2)]
        proj = (asyncio.run(runner.last_states(ids, [row["layer"]]))[:, 0] @ unit).tolist()
        per_fold.append(auroc(proj[:2], proj[2:]))
    for j, q in enumerate(trait.heldout_questions):
        pos = [chat_prompt_ids(lm.tokenizer, [{"role": "system", "content": p["pos"]}, {"role": "user", "content": q}])
               for p in trait.pairs]
        neg = [chat_prompt_ids(lm.tokenizer, [{"role": "system", "content": p["neg"]}, {"role": "user", "content": q}])
               for p in trait.pairs]
        proj = (asyncio.run(runner.last_states(pos + neg, [row["layer"]]))[:, 0] @ unit).tolist()
        per_fold.append(auroc(proj[:2], proj[2:]))
    assert row["cv_auroc"] == pytest.approx(sum(per_fold) / len(per_fold), abs=1e-3)
