"""Which extraction choice makes the best monitor, per vector (``make methods``).

For one trait definition, every candidate builds its directions from the definition's own data
(the same forward passes ``build_vector`` runs):

- the method: teacher-forced written answers (``contrastive_texts``), the model's own answers
  under contrastive system prompts (``contrastive_prompts``, the Persona Vectors recipe) or
  labelled sentences (``labelled_sentences``, the MBTI steering recipe);
- how samples combine: difference of the means, or the first principal component of the paired
  differences (``pca``; the two paired methods only);
- each layer alone, or averaged with its two neighbours (``smooth_layers`` 1);
- the layer (30-75% of depth).

A candidate is scored as a monitor by the AUROC of the last prompt token's projection, eliciting
against opposing system prompts, on every held-out question the project has: ``vectors/
evidence.json``'s (graded system prompts +1, +2 against -1, -2, written for no definition) and
the definition's ``heldout_questions`` (its own positive against negative system prompts).
Questions are split into folds (:data:`EVIDENCE_FOLDS` of the evidence set's, in order, so its
first and second halves are whole folds; :data:`DEFINITION_FOLDS` of the definition's), each fold
scored on its own. The choice is the candidate with the best mean AUROC over folds among those
that steer: in a coefficient sweep on the definition's held-out questions some coefficient moves
the answers' projection by half a neutral std, and it rises from -2c through 0 to +2c (c: the
lower end of the range the sweep recommends). Twelve questions chose before, and the choice overfit them; a mean over every fold
cannot be won on one.

What it is worth is measured the same way it is made, one fold out at a time: the candidate
chosen on the other folds is scored on the fold left out (nested cross-validation; the states
do not depend on the fold, only the choice does, so they are read once). A new choice is
shipped only where it beats the previous build on the folds neither was chosen on: the previous
build's definition records which questions chose it (``extraction.chosen_on``).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Awaitable, Callable

import torch

from steering.chat import chat_prompt_ids
from steering.evidence import TraitEvidence
from steering.extract import (COMBINES, METHODS, PAIRED, SWEEP_QUESTIONS, TraitDefinition, coefficient_sweep,
                              combine_directions, heldout_states, method_samples, recommend_range, smooth_layers,
                              unit_rows)
from steering.runner import EngineRunner
from steering.vector import PersonaVector

CANDIDATES = tuple((m, c, s) for m in METHODS for c in COMBINES for s in (0, 1) if c == "mean" or m in PAIRED)
SIGNED_LEVELS = (-2, -1, 1, 2)
EVIDENCE_FOLDS = 6
DEFINITION_FOLDS = 3
CHOSEN_BY = ("make methods: best mean AUROC over folds of every held-out question (evidence.json's and the "
             "definition's), among candidates that steer")
# What the rule before wrote: chosen on the first half of the evidence questions, among
# candidates that separated all of the definition's held-out questions better than chance.
FIRST_HALF_CHOSEN_BY = "make methods: best AUROC on the first half of evidence.json's questions"


def layer_window(num_layers: int) -> range:
    """The layers a monitor may sit at: 30-75% of depth, as extraction picks them."""
    return range(max(1, math.floor(0.3 * num_layers)), math.ceil(0.75 * num_layers) + 1)


@dataclass(frozen=True)
class Folds:
    """Which fold each question falls in: ``evidence[i]`` for the evidence set's question ``i``,
    ``definition[j]`` for the definition's held-out question ``j``; evidence folds come first."""

    evidence: tuple[int, ...]
    definition: tuple[int, ...]

    @classmethod
    def split(cls, n_evidence: int, n_definition: int) -> "Folds":
        """Contiguous blocks: question order is kept, so questions added later land in later folds.

        Example::

            Folds.split(24, 12).evidence[:5]  # (0, 0, 0, 0, 1)
        """
        ke, kd = min(EVIDENCE_FOLDS, n_evidence), min(DEFINITION_FOLDS, n_definition)
        return cls(tuple(i * ke // n_evidence for i in range(n_evidence)),
                   tuple(ke + j * kd // n_definition for j in range(n_definition)))

    @property
    def count(self) -> int:
        return max((*self.evidence, *self.definition), default=-1) + 1

    def source(self, fold: int) -> str:
        return "evidence" if fold in self.evidence else "definition"

    def unseen(self, extraction: dict) -> list[int]:
        """The folds none of whose questions chose a build made from ``extraction`` (a definition's
        ``extraction`` object): ``chosen_on`` counts the leading questions of each list that chose
        it; the rule before chose on the first half of the evidence questions and checked every
        held-out question of the definition; without an object, the layer came from the
        definition's held-out questions (Cohen's d)."""
        n_e, n_d = len(self.evidence), len(self.definition)
        if "chosen_on" in extraction:
            seen_e, seen_d = extraction["chosen_on"]["evidence_questions"], extraction["chosen_on"]["heldout_questions"]
        elif extraction.get("chosen_by") == FIRST_HALF_CHOSEN_BY:
            seen_e, seen_d = n_e // 2, n_d
        elif extraction.get("layer") is None:
            seen_e, seen_d = 0, n_d
        else:  # a layer fixed by hand, on questions we cannot know
            seen_e, seen_d = n_e, n_d
        seen = set(self.evidence[:seen_e]) | set(self.definition[:seen_d])
        return [f for f in range(self.count) if f not in seen]


def fold_aurocs(proj: torch.Tensor, positive: torch.Tensor, fold: torch.Tensor, count: int) -> torch.Tensor:
    """AUROC of ``proj`` ``[n, ...]`` for ``positive`` against the other rows, within each fold
    (``fold[i]`` is row ``i``'s): ``[count, ...]``; ties count half.

    Example::

        fold_aurocs(torch.tensor([[2.], [1.], [0.], [3.]]), torch.tensor([1, 0, 0, 1]).bool(),
                    torch.tensor([0, 0, 1, 1]), 2)  # [[1.], [1.]]
    """
    out = torch.empty((count, *proj.shape[1:]))
    for f in range(count):
        pos, neg = proj[(fold == f) & positive], proj[(fold == f) & ~positive]
        diff = pos[:, None] - neg[None, :]
        out[f] = ((diff > 0).float() + 0.5 * (diff == 0).float()).mean((0, 1))
    return out


def _spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def ranking(scores: torch.Tensor, folds: list[int]) -> list[int]:
    """Candidates (rows of ``scores`` ``[candidates, folds]``) by mean AUROC over ``folds``, best
    first; ties go to the smaller spread, then to the earlier candidate."""
    cols = scores[:, folds]
    mean, spread = cols.mean(1), cols.std(1) if len(folds) > 1 else torch.zeros(len(cols))
    return sorted(range(len(scores)), key=lambda c: (-round(float(mean[c]), 6), round(float(spread[c]), 6), c))


Steers = Callable[[int], Awaitable[bool]]


async def choose(scores: torch.Tensor, folds: list[int], steers: Steers) -> int | None:
    """The best candidate by :func:`ranking` on ``folds`` that ``steers``; ``None`` when none does.
    ``steers`` is awaited only down to the first candidate that passes."""
    for c in ranking(scores, folds):
        if await steers(c):
            return c
    return None


async def cross_validate(scores: torch.Tensor, steers: Steers) -> dict:
    """Nested cross-validation of :func:`choose` over the columns (folds) of ``scores``: per fold,
    the candidate chosen on the others and its AUROC on that fold; and the choice on every fold,
    the one to ship.

    Example::

        await cross_validate(torch.tensor([[1.0, 0.5, 0.5], [0.8, 0.8, 0.8]]), steers)["chosen"]  # 1
    """
    every = list(range(scores.shape[1]))
    picks = [await choose(scores, [g for g in every if g != f], steers) for f in every]
    held = [None if c is None else float(scores[c, f]) for f, c in zip(every, picks)]
    return {"chosen": await choose(scores, every, steers), "picks": picks, "held_out": held}


def ship_decision(held_out: list[float | None], previous: list[float] | None, unseen: list[int]) -> dict:
    """Ship the new choice only where it beats the previous build on ``unseen`` (the folds the
    previous build was not chosen on; each of ``held_out`` was not seen by the new choice it
    scores): mean over those folds, new against previous. No previous build: ship; no fold to
    compare on, or a fold where the new rule found no candidate that steers: keep the previous."""
    if previous is None:
        return {"ship": True, "reason": "no previous build"}
    if not unseen:
        return {"ship": False, "reason": "every fold chose the previous build: nothing to compare on"}
    if any(held_out[f] is None for f in unseen):
        return {"ship": False, "reason": "no candidate steers"}
    new = sum(held_out[f] for f in unseen) / len(unseen)
    old = sum(previous[f] for f in unseen) / len(unseen)
    return {"ship": new > old, "folds": unseen, "new": round(new, 4), "previous": round(old, 4),
            "reason": f"new {new:.3f} vs previous {old:.3f} on {len(unseen)} folds neither was chosen on"}


def steers_in(sweep: list[dict], c: float) -> bool:
    """Whether the sweep's answers' projection rises from ``-2c`` through 0 to ``+2c``."""
    at = {r["coefficient"]: r["projection"] for r in sweep}
    return at[-2 * c] < at[0.0] < at[2 * c]


def moves(sweep: list[dict], neutral_std: float) -> bool:
    """Whether some positive coefficient of the sweep moves the answers' projection by half a
    neutral std: where none does, :func:`~steering.extract.recommend_range` falls back to the
    smallest coefficient, and a rise from -2c to +2c at that c can be a few hundredths (the
    cross-validated rule first shipped such a `hallucinating`, 2026-12-06)."""
    base = next(r["projection"] for r in sweep if r["coefficient"] == 0.0)
    return any(r["coefficient"] > 0 and r["projection"] - base >= 0.5 * neutral_std for r in sweep)


def build_steers(vector) -> bool:
    """Whether a built vector's own coefficient sweep (``extra["coefficient_sweep"]``) rises from
    -2c through 0 to +2c at its range's lower end c (+-c where the grid lacks +-2c): the build
    re-estimates the neutral spread and the range, so a choice that passed :func:`steering_check`
    is checked again on what would ship."""
    sweep = vector.extra.get("coefficient_sweep") or []
    at = {r["coefficient"]: r["projection"] for r in sweep}
    c = vector.coefficient_range[0] if vector.coefficient_range else None
    if c is None or 0.0 not in at:
        return False
    step = 2 * c if 2 * c in at and -2 * c in at else c
    return -step in at and step in at and at[-step] < at[0.0] < at[step]


async def steering_check(runner: EngineRunner, tok, directions: torch.Tensor, layer: int, questions: list[str],
                         neutral_std: float) -> dict:
    """Sweep ``directions`` at ``layer`` as extraction does, take c = the lower end of the range
    it recommends; the candidate steers where the sweep :func:`moves` the projection at all and
    :func:`steers_in` holds at c (sweeping ``+-2c`` too when the grid lacks it)."""
    sweep = await coefficient_sweep(runner, tok, directions, layer, questions)
    c = recommend_range(sweep, neutral_std)[0]
    if 2 * c not in {r["coefficient"] for r in sweep}:
        extra = await coefficient_sweep(runner, tok, directions, layer, questions, grid=(2 * c,))
        sweep = sorted(sweep + [r for r in extra if r["coefficient"]], key=lambda r: r["coefficient"])
    at = {r["coefficient"]: r["projection"] for r in sweep}
    moving = moves(sweep, neutral_std)
    return {"steers": moving and steers_in(sweep, c), "moves": moving, "c": c,
            "projection": [at[-2 * c], at[0.0], at[2 * c]]}


def _signed_grid(evidence: TraitEvidence) -> list[tuple[int, int]]:
    return [(level, i) for level in SIGNED_LEVELS for i in range(len(evidence.questions))]


async def compare(runner: EngineRunner, tok, trait: TraitDefinition, evidence: TraitEvidence, num_layers: int,
                  shipped: PersonaVector | None = None, *, neutral_prompts: list[str]) -> dict:
    """Score every candidate in :data:`CANDIDATES` x :func:`layer_window` for ``trait`` per fold,
    choose by cross-validation, and decide against ``shipped`` (the previous build). ``samples``
    (method -> :class:`~steering.extract.Samples`) lets the caller build the vector without
    reading them again.

    Example::

        result = await compare(EngineRunner(engine), lm.tokenizer, TraitDefinition.load(path),
                               load_evidence(evidence_path)["evil"], lm.num_layers, shipped, neutral_prompts=neutral)
        result["chosen"], result["decision"]["ship"]
    """
    if len(evidence.questions) < 2 or len(trait.heldout_questions) < 1 or not trait.pairs:
        raise ValueError(f"{trait.name}: cross-validation needs at least 2 evidence questions and a held-out "
                         "question with a system-prompt pair")
    folds = Folds.split(len(evidence.questions), len(trait.heldout_questions))
    grid = _signed_grid(evidence)
    ev_states = await runner.last_states([chat_prompt_ids(tok, evidence.messages(level, evidence.questions[i]))
                                          for level, i in grid])
    held_pos, held_neg = await heldout_states(runner, tok, trait)
    neutral = await runner.last_states([chat_prompt_ids(tok, [{"role": "user", "content": p}]) for p in neutral_prompts])
    states = torch.cat([ev_states, held_pos, held_neg])
    per_pair = len(trait.pairs)
    positive = torch.tensor([level > 0 for level, _ in grid] + [True] * len(held_pos) + [False] * len(held_neg))
    fold = torch.tensor([folds.evidence[i] for _, i in grid] +
                        [folds.definition[r // per_pair] for r in range(len(held_pos))] * 2)

    def per_fold(directions: torch.Tensor) -> torch.Tensor:  # [folds, L+1]
        return fold_aurocs((states * unit_rows(directions)).sum(-1), positive, fold, folds.count)

    data = {"contrastive_texts": bool(trait.texts),
            "contrastive_prompts": bool(trait.pairs) and bool(trait.questions),
            "labelled_sentences": all(trait.sentences.get(side) for side in ("pos", "neg"))}
    if not any(data.values()):
        raise ValueError(f"{trait.name}: the definition has data for no method (texts, pairs with questions, sentences)")
    samples = {method: await method_samples(runner, tok, trait, method) for method in METHODS if data[method]}

    window = list(layer_window(num_layers))
    configs = [c for c in CANDIDATES if c[0] in samples]
    directions = {c: smooth_layers(combine_directions(samples[c[0]], c[1]), c[2]) for c in configs}
    candidates = [(c, layer) for c in configs for layer in window]
    table = {c: per_fold(directions[c]) for c in configs}
    scores = torch.stack([table[c][:, layer] for c, layer in candidates])  # [candidates, folds]

    checks: dict[int, dict] = {}

    async def steers(k: int) -> bool:
        if k not in checks:
            config, layer = candidates[k]
            std = float((neutral * unit_rows(directions[config])[layer]).sum(-1).std())
            checks[k] = await steering_check(runner, tok, directions[config], layer,
                                             trait.heldout_questions[:SWEEP_QUESTIONS], std)
        return checks[k]["steers"]

    cv = await cross_validate(scores, steers)

    def describe(k: int | None) -> dict | None:
        if k is None:
            return None
        (method, combine, radius), layer = candidates[k]
        return {"method": method, "combine": combine, "smooth_layers": radius, "layer": layer}

    def summary(values: list[float]) -> dict:
        return {"mean": round(sum(values) / len(values), 4), "sd": round(_spread(values), 4),
                "min": round(min(values), 4), "max": round(max(values), 4)}

    every = range(folds.count)
    ev_folds = [f for f in every if folds.source(f) == "evidence"]
    nested = [v for v in cv["held_out"] if v is not None]
    rows = []
    for config in configs:
        k = max((candidates.index((config, layer)) for layer in window), key=lambda k: float(scores[k].mean()))
        rows.append({**describe(k), "cv_auroc": round(float(scores[k].mean()), 4),
                     "sd": round(_spread(scores[k].tolist()), 4),
                     "steers": checks[k]["steers"] if k in checks else None})
    out = {
        "vector": trait.name, "folds": {"evidence": list(folds.evidence), "definition": list(folds.definition)},
        "rows": rows,
        "chosen": describe(cv["chosen"]),
        "chosen_fold_auroc": None if cv["chosen"] is None else [round(float(x), 4) for x in scores[cv["chosen"]]],
        "nested": {"picks": [describe(k) for k in cv["picks"]],
                   "auroc": [None if v is None else round(v, 4) for v in cv["held_out"]],
                   "all": summary(nested) if nested else None,
                   "evidence": summary([cv["held_out"][f] for f in ev_folds if cv["held_out"][f] is not None])
                   if any(cv["held_out"][f] is not None for f in ev_folds) else None},
        "steering_checks": [{**describe(k), **v} for k, v in sorted(checks.items())],
        "samples": samples,
    }
    previous = None
    if shipped is not None:
        previous = per_fold(shipped.directions)[:, shipped.recommended_layer].tolist()
        unseen = folds.unseen(trait.extraction)
        out["previous"] = {"method": shipped.method, "layer": shipped.recommended_layer,
                           "fold_auroc": [round(x, 4) for x in previous], "unseen_folds": unseen,
                           "unseen": summary([previous[f] for f in unseen]) if unseen else None}
    else:
        unseen = list(every)
    out["decision"] = ship_decision(cv["held_out"], previous, unseen) if cv["chosen"] is not None else \
        {"ship": False, "reason": "no candidate steers"}
    return out


def extraction_spec(result: dict, model: str) -> dict:
    """The ``extraction`` object a definition gets from ``result``'s choice on ``model`` (its layer
    applies to that model only; ``chosen_on`` counts the questions that chose it)."""
    folds = result["folds"]
    return {**result["chosen"], "model": model, "chosen_by": CHOSEN_BY,
            "chosen_on": {"evidence_questions": len(folds["evidence"]), "heldout_questions": len(folds["definition"])}}


def _label(method: str, combine: str, radius: int) -> str:
    short = {"contrastive_texts": "texts", "contrastive_prompts": "prompts", "labelled_sentences": "sentences"}[method]
    return short + (" PCA" if combine == "pca" else "") + (" ±1 layer" if radius else "")


def _ms(summary: dict | None) -> str:
    return "-" if summary is None else f"{summary['mean']:.2f} ± {summary['sd']:.2f}"


def markdown(results: list[dict], *, header: str) -> str:
    """One row per vector: each candidate's mean AUROC over folds at its best layer, the choice,
    its nested cross-validated AUROC (mean ± sd over folds), the previous build on the folds it
    was not chosen on, and what was shipped with its AUROC on folds that did not choose it."""
    labels = [_label(*c) for c in CANDIDATES]
    lines = [header, "",
             "| vector | " + " | ".join(labels) + " | chosen (layer) | nested CV AUROC, all folds | evidence folds | "
             "new vs previous on folds neither chose (n) | shipped: AUROC ± sd on folds it was not chosen on |",
             "|---|" + "---|" * (len(labels) + 5)]
    for res in results:
        by_key = {(r["method"], r["combine"], r["smooth_layers"]): r for r in res["rows"]}
        cells = [f"{by_key[c]['cv_auroc']:.2f}" + ("" if by_key[c]["steers"] is not False else " ✗")
                 if c in by_key else "-" for c in CANDIDATES]
        best = res["chosen"]
        decision = res["decision"]
        vs = (f"{decision['new']:.2f} vs {decision['previous']:.2f} ({len(decision['folds'])})"
              if "new" in decision else decision["reason"])
        shipped = (f"new, {_ms(res['nested']['all'])}" if decision["ship"] else
                   f"previous ({res['previous']['layer']}), {_ms(res['previous']['unseen'])}" if res.get("previous") else "-")
        lines.append(
            f"| `{res['vector']}` | " + " | ".join(cells) + " | " +
            (f"{_label(best['method'], best['combine'], best['smooth_layers'])} ({best['layer']})" if best else "-") +
            f" | **{_ms(res['nested']['all'])}** | {_ms(res['nested']['evidence'])} | {vs} | {shipped} |")
    return "\n".join(lines)
