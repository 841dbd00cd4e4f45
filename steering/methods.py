"""Which extraction choice makes the best monitor, per vector (``make methods``).

For one trait definition, every candidate builds its directions from the definition's own data
(the same forward passes ``build_vector`` runs):

- the method: teacher-forced written answers (``contrastive_texts``), the model's own answers
  under contrastive system prompts (``contrastive_prompts``, the Persona Vectors recipe) or
  labelled sentences (``labelled_sentences``, the MBTI steering recipe);
- how samples combine: difference of the means, or the first principal component of the paired
  differences (``pca``; the two paired methods only);
- each layer alone, or averaged with its two neighbours (``smooth_layers`` 1).

Each candidate is scored as a monitor on ``vectors/evidence.json``: the last prompt token's
projection under its graded system prompts that elicit (+1, +2) against those that oppose
(-1, -2) the trait, questions and system prompts that no definition contains. The first half of
those questions chooses: per candidate the layer (30-75% of depth) with the best AUROC, then the
candidate with the best AUROC there (ties: the larger Cohen's d) among those that also tell the
definition's own held-out prompts apart better than chance at that layer (a vector is shipped
for steering too). The second half only reports.
Beside it, the report half's AUROC at the layer the definition's own held-out questions pick by
Cohen's d (the rule used before), and the shipped vector's at its recommended layer.
"""

from __future__ import annotations

import math

import torch

from steering.chat import chat_prompt_ids
from steering.evidence import TraitEvidence
from steering.extract import (COMBINES, METHODS, PAIRED, TraitDefinition, auroc, cohens_d, combine_directions,
                              heldout_states, method_samples, smooth_layers, unit_rows)
from steering.runner import EngineRunner
from steering.vector import PersonaVector

CANDIDATES = tuple((m, c, s) for m in METHODS for c in COMBINES for s in (0, 1) if c == "mean" or m in PAIRED)
SIGNED_LEVELS = (-2, -1, 1, 2)
CHOSEN_BY = "make methods: best AUROC on the first half of evidence.json's questions"
MIN_DEFINITION_AUROC = 0.5


def layer_window(num_layers: int) -> range:
    """The layers a monitor may sit at: 30-75% of depth, as extraction picks them."""
    return range(max(1, math.floor(0.3 * num_layers)), math.ceil(0.75 * num_layers) + 1)


def _split_auroc(proj: torch.Tensor, levels: list[int], keep: list[int]) -> float:
    return auroc([float(proj[k]) for k in keep if levels[k] > 0], [float(proj[k]) for k in keep if levels[k] < 0])


def _split_d(proj: torch.Tensor, levels: list[int], keep: list[int]) -> float:
    pos = torch.tensor([float(proj[k]) for k in keep if levels[k] > 0])
    neg = torch.tensor([float(proj[k]) for k in keep if levels[k] < 0])
    return float(cohens_d(pos, neg))


async def compare(runner: EngineRunner, tok, trait: TraitDefinition, evidence: TraitEvidence, num_layers: int,
                  shipped: PersonaVector | None = None) -> dict:
    """Score every candidate in :data:`CANDIDATES` for ``trait``; the chosen one is ``rows[chosen]``;
    ``samples`` (method -> :class:`~steering.extract.Samples`) lets the caller build the vector
    without reading them again.

    Example::

        result = await compare(EngineRunner(engine), lm.tokenizer, TraitDefinition.load(path),
                               load_evidence(evidence_path)["evil"], lm.num_layers)
        result["rows"][result["chosen"]]
    """
    questions = evidence.questions
    half = len(questions) // 2
    if half < 2:
        raise ValueError(f"{evidence.name}: the evidence needs at least 4 questions to split, has {len(questions)}")
    grid = [(level, i) for level in SIGNED_LEVELS for i in range(len(questions))]
    levels = [level for level, _ in grid]
    select = [k for k, (_, i) in enumerate(grid) if i < half]
    report = [k for k, (_, i) in enumerate(grid) if i >= half]
    states = await runner.last_states([chat_prompt_ids(tok, evidence.messages(level, questions[i])) for level, i in grid])
    window = layer_window(num_layers)
    held_pos, held_neg = await heldout_states(runner, tok, trait)

    data = {"contrastive_texts": bool(trait.texts),
            "contrastive_prompts": bool(trait.pairs) and bool(trait.questions),
            "labelled_sentences": all(trait.sentences.get(side) for side in ("pos", "neg"))}
    if not any(data.values()):
        raise ValueError(f"{trait.name}: the definition has data for no method (texts, pairs with questions, sentences)")
    samples = {method: await method_samples(runner, tok, trait, method) for method in METHODS if data[method]}

    rows = []
    for method, combine, radius in CANDIDATES:
        if method not in samples:
            continue
        directions = smooth_layers(combine_directions(samples[method], combine), radius)
        unit = unit_rows(directions)
        proj = (states * unit).sum(-1)  # [n, L+1]
        chosen_layer = max(window, key=lambda layer: (_split_auroc(proj[:, layer], levels, select),
                                                      _split_d(proj[:, layer], levels, select)))
        separation = cohens_d((held_pos * unit).sum(-1), (held_neg * unit).sum(-1))
        d_layer = max(window, key=lambda layer: float(separation[layer]))
        held = (held_pos * unit).sum(-1)[:, chosen_layer], (held_neg * unit).sum(-1)[:, chosen_layer]
        rows.append({
            "method": method, "combine": combine, "smooth_layers": radius, "layer": chosen_layer,
            "definition_auroc": round(auroc(held[0].tolist(), held[1].tolist()), 4),
            "select_auroc": round(_split_auroc(proj[:, chosen_layer], levels, select), 4),
            "select_d": round(_split_d(proj[:, chosen_layer], levels, select), 4),
            "report_auroc": round(_split_auroc(proj[:, chosen_layer], levels, report), 4),
            "cohens_d_layer": d_layer,
            "report_auroc_at_cohens_d_layer": round(_split_auroc(proj[:, d_layer], levels, report), 4),
        })
    # A shipped vector must also tell its own definition's held-out prompts apart better than
    # chance; where no candidate does, the one that comes closest.
    eligible = [k for k, r in enumerate(rows) if r["definition_auroc"] > MIN_DEFINITION_AUROC] or \
        [max(range(len(rows)), key=lambda k: rows[k]["definition_auroc"])]
    chosen = max(eligible, key=lambda k: (rows[k]["select_auroc"], rows[k]["select_d"]))
    out = {"vector": trait.name, "questions_choosing": half, "questions_reporting": len(questions) - half,
           "rows": rows, "chosen": chosen, "samples": samples}
    if shipped is not None:
        proj = (states * unit_rows(shipped.directions)).sum(-1)[:, shipped.recommended_layer]
        out["shipped"] = {"method": shipped.method, "layer": shipped.recommended_layer,
                          "report_auroc": round(_split_auroc(proj, levels, report), 4)}
    return out


def extraction_spec(result: dict, model: str) -> dict:
    """The ``extraction`` object a definition gets from ``result``'s chosen candidate on ``model``
    (its layer applies to that model only)."""
    row = result["rows"][result["chosen"]]
    return {"method": row["method"], "combine": row["combine"], "smooth_layers": row["smooth_layers"],
            "layer": row["layer"], "model": model, "chosen_by": CHOSEN_BY}


def _label(method: str, combine: str, radius: int) -> str:
    short = {"contrastive_texts": "texts", "contrastive_prompts": "prompts", "labelled_sentences": "sentences"}[method]
    return short + (" PCA" if combine == "pca" else "") + (" ±1 layer" if radius else "")


def markdown(results: list[dict], *, header: str) -> str:
    """One row per vector: each candidate's AUROC on the reporting half at the layer the choosing
    half picked, the chosen candidate, and the two references."""
    labels = [_label(*c) for c in CANDIDATES]
    lines = [header, "",
             "| vector | " + " | ".join(labels) + " | chosen (layer): AUROC choosing / reporting | chosen, at the Cohen's d "
             "layer instead | shipped before (layer) |",
             "|---|" + "---|" * (len(labels) + 3)]
    for res in results:
        by_key = {(r["method"], r["combine"], r["smooth_layers"]): r for r in res["rows"]}
        cells = [f"{by_key[c]['report_auroc']:.2f}" if c in by_key else "-" for c in CANDIDATES]
        best = res["rows"][res["chosen"]]
        shipped = res.get("shipped")
        lines.append(
            f"| `{res['vector']}` | " + " | ".join(cells) +
            f" | {_label(best['method'], best['combine'], best['smooth_layers'])} ({best['layer']}): "
            f"{best['select_auroc']:.2f} / **{best['report_auroc']:.2f}** | "
            f"{best['report_auroc_at_cohens_d_layer']:.2f} ({best['cohens_d_layer']}) | "
            + (f"{shipped['report_auroc']:.2f} ({shipped['layer']})" if shipped else "-") + " |")
    return "\n".join(lines)
