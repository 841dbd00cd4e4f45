"""Evidence that the monitors mean something on this model (``make evidence``).

For every vector, ``vectors/evidence.json`` gives system prompts at five graded levels, from
strongly opposing the trait (-2) through a neutral one (0) to strongly eliciting it (+2),
and held-out questions; none of them appears in any trait definition, so nothing here was
seen by extraction. Every (level, question) pair is answered greedily, unsteered, and the
same forward passes report the vector's projection at its recommended layer:

- ``prompt_projection``: the last prompt token's, what a monitor scores before any token;
- ``response_projection``: the mean over the answer's tokens (the trait inside the model);
- ``lexicon``: a judge-free count over the answer's text that does not use the vector (trait
  words minus opposite words per 100 words; the evidence file says how well it fits).

Per vector: Pearson r of the prompt projection with each of the two expression measures (the
Persona Vectors paper reports r = 0.75-0.83 between the last-prompt projection and a judge's
trait score), the same r with the level, and the AUROC of the prompt projection for eliciting
(+1, +2) against opposing (-1, -2) prompts: a split disjoint from extraction in both
questions and system prompts. Last, whether another layer would monitor better: a layer is
picked by that AUROC on the first half of the questions and scored on the second half, beside
the recommended layer on the same half.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from steering.chat import chat_prompt_ids
from steering.extract import auroc, unit_rows
from steering.runner import EngineRunner
from steering.vector import PersonaVector

LEVELS = (-2, -1, 0, 1, 2)
PAPER_R = (0.75, 0.83)


def pearson(x: list[float], y: list[float]) -> float | None:
    """Pearson correlation of two equally long samples; ``None`` when either is constant.

    Example::

        pearson([1, 2, 3], [2, 4, 7])  # 0.99
    """
    if len(x) != len(y) or len(x) < 2:
        raise ValueError("pearson needs two samples of the same length, at least 2 each")
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def _pattern(entry: str) -> re.Pattern:
    # Word boundaries only where the entry starts or ends with a word character ("!" has none).
    head = r"\b" if entry[0].isalnum() else ""
    tail = r"\b" if entry[-1].isalnum() else ""
    return re.compile(head + re.escape(entry) + tail)


@dataclass
class Lexicon:
    """Words and phrases that show a trait (``pos``) or its opposite (``neg``) in a text."""

    pos: list[str]
    neg: list[str]
    fit: str

    def __post_init__(self) -> None:
        self._pos = [_pattern(w.lower()) for w in self.pos]
        self._neg = [_pattern(w.lower()) for w in self.neg]

    def score(self, text: str) -> float:
        """Trait hits minus opposite hits per 100 words of ``text`` (0 for an empty text).

        Example::

            Lexicon(pos=["great"], neg=["bad"], fit="").score("a great day, not bad")  # 0.0
        """
        lowered = text.lower()
        words = len(re.findall(r"[a-z0-9']+", lowered))
        if not words:
            return 0.0
        hits = sum(len(p.findall(lowered)) for p in self._pos) - sum(len(p.findall(lowered)) for p in self._neg)
        return 100.0 * hits / words


@dataclass
class TraitEvidence:
    """One vector's graded system prompts, its questions and its lexicon."""

    name: str
    system: dict[int, str | None]
    questions: list[str]
    lexicon: Lexicon

    def messages(self, level: int, question: str) -> list[dict]:
        system = self.system[level]
        head = [{"role": "system", "content": system}] if system else []
        return head + [{"role": "user", "content": question}]


def load_evidence(path: Path) -> dict[str, TraitEvidence]:
    """Read ``vectors/evidence.json``: vector name -> :class:`TraitEvidence`."""
    data = json.loads(Path(path).read_text())
    out = {}
    for name, spec in data["traits"].items():
        system = {int(level): text for level, text in spec["levels"].items()}
        system[0] = data["neutral_system"]
        if sorted(system) != list(LEVELS):
            raise ValueError(f"{name}: levels must be {LEVELS}, got {sorted(system)}")
        out[name] = TraitEvidence(name=name, system=system, questions=data["questions"][spec["questions"]],
                                  lexicon=Lexicon(**spec["lexicon"]))
    return out


def check_held_out(evidence: TraitEvidence, definition: dict) -> None:
    """Raise if a question or system prompt of ``evidence`` also appears in the trait's definition
    (the vector's extraction data): the measurement must be held out in both."""
    seen = set(definition.get("questions", [])) | set(definition.get("heldout_questions", []))
    seen |= {t.get("question") for t in definition.get("texts", [])}
    prompts = {pair.get(side) for pair in definition.get("pairs", []) for side in ("pos", "neg")}
    shared = (set(evidence.questions) & seen) | (set(evidence.system.values()) & prompts)
    if shared:
        raise ValueError(f"{evidence.name}: evidence shares text with the trait definition: {sorted(shared)[:3]}")


async def measure(runner: EngineRunner, tok, vector: PersonaVector, evidence: TraitEvidence, *,
                  levels: tuple[int, ...] = LEVELS, questions: int | None = None, max_new_tokens: int = 48) -> dict:
    """Answer every (level, question) pair greedily and correlate the monitor's score with the
    trait's expression in the answer. Reads the model only through ``runner``'s engine.

    Example::

        result = await measure(EngineRunner(engine), lm.tokenizer, registry.get("evil"), load_evidence(path)["evil"])
        result["r_response"], result["auroc"]
    """
    layer = vector.recommended_layer
    unit = unit_rows(vector.directions)[layer]
    asked = evidence.questions[:questions]
    grid = [(level, q) for level in levels for q in asked]
    prompts = [chat_prompt_ids(tok, evidence.messages(level, q)) for level, q in grid]
    answers = await runner.probed_answers(prompts, layer, unit, max_new_tokens=max_new_tokens)
    points = [{
        "level": level,
        "question": q,
        "prompt_projection": a.prompt_projection,
        "response_projection": sum(a.token_projections) / len(a.token_projections) if a.token_projections else None,
        "lexicon": evidence.lexicon.score(a.text),
        "answer": a.text,
    } for (level, q), a in zip(grid, answers)]
    with_response = [p for p in points if p["response_projection"] is not None]

    def r(xs: list[dict], key: str) -> float | None:
        return pearson([p["prompt_projection"] for p in xs], [float(p[key]) for p in xs])

    def mean(key: str, level: int) -> float:
        values = [p[key] for p in points if p["level"] == level and p[key] is not None]
        return sum(values) / len(values) if values else float("nan")

    return {
        **await _layer_choice(runner, tok, vector, evidence, asked, levels),
        "vector": vector.name,
        "layer": layer,
        "n": len(points),
        "levels": list(levels),
        "questions": len(asked),
        "r_response": r(with_response, "response_projection"),
        "r_lexicon": r(points, "lexicon"),
        "r_level": r(points, "level"),
        "auroc": auroc([p["prompt_projection"] for p in points if p["level"] > 0],
                       [p["prompt_projection"] for p in points if p["level"] < 0]),
        "lexicon_fit": evidence.lexicon.fit,
        "per_level": {str(level): {key: mean(key, level) for key in ("prompt_projection", "response_projection", "lexicon")}
                      for level in levels},
        "points": points,
    }


async def _layer_choice(runner: EngineRunner, tok, vector: PersonaVector, evidence: TraitEvidence,
                        asked: list[str], levels: tuple[int, ...]) -> dict:
    """Pick a layer (within 30-75% of depth, as extraction does) by AUROC on the first half of
    the questions; report its AUROC and the recommended layer's on the second half."""
    half = len(asked) // 2
    signed = [level for level in levels if level]
    if half < 1 or not any(level > 0 for level in signed) or not any(level < 0 for level in signed):
        return {"layer_choice": None}
    grid = [(level, i) for level in signed for i in range(len(asked))]
    prompts = [chat_prompt_ids(tok, evidence.messages(level, asked[i])) for level, i in grid]
    proj = (await runner.last_states(prompts) * unit_rows(vector.directions)).sum(-1)  # [n, L+1]

    def score(layer: int, first_half: bool) -> float:
        keep = [k for k, (_level, i) in enumerate(grid) if (i < half) == first_half]
        return auroc([float(proj[k, layer]) for k in keep if grid[k][0] > 0],
                     [float(proj[k, layer]) for k in keep if grid[k][0] < 0])

    layers = proj.shape[1] - 1
    lo, hi = max(1, math.floor(0.3 * layers)), math.ceil(0.75 * layers)
    picked = max(range(lo, hi + 1), key=lambda layer: score(layer, True))
    return {"layer_choice": {"picked_layer": picked, "picked_auroc": score(picked, False),
                             "recommended_auroc": score(vector.recommended_layer, False),
                             "questions_picking": half, "questions_scoring": len(asked) - half}}


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown(results: list[dict], *, header: str) -> str:
    """The evidence table (README block), one row per vector."""
    lines = [
        header,
        "",
        "| vector | layer | r, prompt projection vs answer's mean projection | r, prompt projection vs lexicon | "
        "r, prompt projection vs level | held-out AUROC (+1,+2 vs -1,-2) | layer picked by AUROC on half the "
        "questions: layer, AUROC on the other half (recommended layer's) | lexicon (fit) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        choice = res.get("layer_choice")
        picked = (f"{choice['picked_layer']}: {choice['picked_auroc']:.2f} ({choice['recommended_auroc']:.2f})"
                  if choice else "-")
        lines.append(f"| `{res['vector']}` | {res['layer']} | {_cell(res['r_response'])} | {_cell(res['r_lexicon'])} | "
                     f"{_cell(res['r_level'])} | {_cell(res['auroc'])} | {picked} | {res['lexicon_fit']} |")
    return "\n".join(lines)
