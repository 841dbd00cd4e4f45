"""Personality assessment: forced-choice MBTI and Likert Big Five inventories, scored from the
model's next-token probabilities on the option labels (no parsing of generated text).

Each item is asked ``repetitions`` times with its options shuffled (order and label set
change), so a model that prefers "the first option" or "label 1" scores near 50%, not 100%.
All (item, repetition) prompts are prefill-only requests batched through the engine, under
the request's steering when one is given. Reliability across repetitions is Fleiss' kappa
(items as subjects, repetitions as raters), also reported as a function of the number of
repetitions so users see where it stabilises.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from steering.adapters import Adapter
from steering.chat import chat_prompt_ids
from steering.engine import Engine
from steering.limits import PromptLimit
from steering.runner import EngineRunner
from steering.steer import RowSteering

MBTI_LABEL_SETS = (("1", "2"), ("A", "B"))
LIKERT_LABELS = ("1", "2", "3", "4", "5")


@dataclass
class Inventory:
    name: str
    kind: str  # "mbti" (forced choice) or "big5" (Likert)
    items: list[dict]
    dimensions: dict[str, list[str]]  # mbti: "E-I" -> ["E", "I"]; big5: factor -> []
    scale: list[str]

    @classmethod
    def load(cls, path: Path) -> "Inventory":
        data = json.loads(Path(path).read_text())
        if "dimensions" in data:
            return cls(data["name"], "mbti", data["items"], data["dimensions"], [])
        return cls(data["name"], "big5", data["items"], {f: [] for f in data["factors"]}, data["scale"])


def fleiss_kappa(counts: list[list[int]]) -> float:
    """Fleiss' kappa of ``counts[subject][category]`` (same number of raters per subject).

    Example::

        fleiss_kappa([[3, 0], [0, 3]])   # 1.0: every rater agrees on every subject
    """
    n_sub = len(counts)
    raters = sum(counts[0])
    if n_sub == 0 or raters < 2:
        return float("nan")
    total = n_sub * raters
    p_cat = [sum(row[j] for row in counts) / total for j in range(len(counts[0]))]
    p_sub = [(sum(c * c for c in row) - raters) / (raters * (raters - 1)) for row in counts]
    p_bar = sum(p_sub) / n_sub
    p_e = sum(p * p for p in p_cat)
    if math.isclose(p_e, 1.0):
        return 1.0  # every answer in one category: perfect (if trivial) agreement
    return (p_bar - p_e) / (1 - p_e)


def _single_token(tokenizer, label: str) -> int:
    ids = tokenizer(label, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"option label {label!r} is not a single token for this tokenizer")
    return ids[0]


@dataclass
class _Ask:
    item: dict
    rep: int
    prompt: list[int]
    option_ids: tuple[int, ...]
    meaning: list  # what each label stands for: a pole (mbti) or a Likert value 1..5 (big5)


def _mbti_prompt(tokenizer, item: dict, poles: list[str], rng: random.Random, rep: int) -> _Ask:
    labels = MBTI_LABEL_SETS[rep % len(MBTI_LABEL_SETS)]
    order = poles[:] if rng.random() < 0.5 else poles[::-1]
    text = (f"{item['question']}\n{labels[0]}. {item['options'][order[0]]}\n{labels[1]}. {item['options'][order[1]]}\n"
            f"Answer with {labels[0]} or {labels[1]} only.")
    ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": text}])
    return _Ask(item, rep, ids, tuple(_single_token(tokenizer, label) for label in labels), order)


def _likert_prompt(tokenizer, item: dict, scale: list[str], rng: random.Random, rep: int) -> _Ask:
    values = [1, 2, 3, 4, 5] if rng.random() < 0.5 else [5, 4, 3, 2, 1]
    lines = "\n".join(f"{label}. {scale[v - 1]}" for label, v in zip(LIKERT_LABELS, values))
    text = (f"How well does this statement describe you?\n\"{item['statement']}\"\n{lines}\n"
            "Answer with the number only.")
    ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": text}])
    return _Ask(item, rep, ids, tuple(_single_token(tokenizer, label) for label in LIKERT_LABELS), values)


async def assess(
    engine: Engine,
    inventory: Inventory,
    *,
    repetitions: int = 30,
    steering: RowSteering | None = None,
    seed: int = 0,
    label_bias: list[float] | None = None,
    progress: Callable[[int], None] | None = None,
    limit: PromptLimit | None = None,
    adapter: Adapter | None = None,
) -> dict:
    """Answer every item ``repetitions`` times and score the inventory, with the LoRA ``adapter``
    when one is given (an adapter's personality, measured like the base model's).

    ``label_bias`` adds to each label position's log-probability (first label, second, ...):
    a controlled position bias, used to show that shuffling cancels it. Before any forward
    pass, the longest item prompt is checked against ``limit`` (default: the model's context);
    :class:`~steering.limits.PromptTooLongError` names ``inventory``.

    Example::

        result = await assess(engine, Inventory.load(path), repetitions=10)
    """
    tok = engine.lm.tokenizer
    rng = random.Random(seed)
    asks = []
    for rep in range(repetitions):
        for item in inventory.items:
            if inventory.kind == "mbti":
                asks.append(_mbti_prompt(tok, item, inventory.dimensions[item["dimension"]], rng, rep))
            else:
                asks.append(_likert_prompt(tok, item, inventory.scale, rng, rep))

    longest = max(asks, key=lambda a: len(a.prompt))
    (limit or PromptLimit(engine.max_model_len)).check(
        len(longest.prompt), what=f"item {longest.item['id']} of the {inventory.name} inventory", param="inventory")
    runner = EngineRunner(engine, progress=progress, adapter=adapter)
    logprobs = await runner.option_logprobs([a.prompt for a in asks], [a.option_ids for a in asks], steering=steering)

    answers = []
    for ask, lp in zip(asks, logprobs):
        if label_bias:
            lp = [x + b for x, b in zip(lp, label_bias)]
        top = max(lp)
        weights = [math.exp(x - top) for x in lp]
        probs = [w / sum(weights) for w in weights]  # renormalised over the option labels
        choice = max(range(len(probs)), key=probs.__getitem__)
        answers.append({"item": ask.item["id"], "rep": ask.rep,
                        "probs": {str(m): round(p, 4) for m, p in zip(ask.meaning, probs)},
                        "choice": ask.meaning[choice]})
    scored = _score_mbti(inventory, answers, repetitions) if inventory.kind == "mbti" else _score_big5(inventory, answers, repetitions)
    return {"inventory": inventory.name, "repetitions": repetitions, "seed": seed, **scored}


def _kappa_curve(by_item: dict[str, list], categories: list, repetitions: int) -> list[dict]:
    curve = []
    for k in range(2, repetitions + 1):
        counts = [[answers[:k].count(c) for c in categories] for answers in by_item.values()]
        curve.append({"repetitions": k, "kappa": round(fleiss_kappa(counts), 4)})
    return curve


def _score_mbti(inv: Inventory, answers: list[dict], repetitions: int) -> dict:
    dims = {}
    letters = []
    for dim, (first, second) in inv.dimensions.items():
        ids = {i["id"] for i in inv.items if i["dimension"] == dim}
        mine = [a for a in answers if a["item"] in ids]
        share = sum(a["choice"] == first for a in mine) / len(mine)
        mean_prob = sum(a["probs"][first] for a in mine) / len(mine)
        by_item: dict[str, list] = {}
        for a in mine:
            by_item.setdefault(a["item"], []).append(a["choice"])
        curve = _kappa_curve(by_item, [first, second], repetitions)
        dims[dim] = {"share": {first: round(share, 4), second: round(1 - share, 4)},
                     "mean_probability": {first: round(mean_prob, 4), second: round(1 - mean_prob, 4)},
                     "kappa": curve[-1]["kappa"] if curve else None, "kappa_curve": curve,
                     "items": {i: {first: round(c.count(first) / len(c), 4)} for i, c in sorted(by_item.items())}}
        letters.append(first if share >= 0.5 else second)
    return {"type": "".join(letters), "dimensions": dims}


def _score_big5(inv: Inventory, answers: list[dict], repetitions: int) -> dict:
    factors = {}
    keyed = {i["id"]: i["keyed"] for i in inv.items}
    for factor in inv.dimensions:
        ids = {i["id"] for i in inv.items if i["factor"] == factor}
        mine = [a for a in answers if a["item"] in ids]

        def value(a) -> float:
            expected = sum(int(v) * p for v, p in a["probs"].items())
            return expected if keyed[a["item"]] == "+" else 6 - expected

        score = sum(value(a) for a in mine) / len(mine)
        by_item: dict[str, list] = {}
        for a in mine:
            by_item.setdefault(a["item"], []).append(a["choice"])
        curve = _kappa_curve(by_item, [1, 2, 3, 4, 5], repetitions)
        factors[factor] = {"score": round(score, 4), "kappa": curve[-1]["kappa"] if curve else None, "kappa_curve": curve,
                           "items": {i: round(sum(value(a) for a in mine if a["item"] == i) / repetitions, 4)
                                     for i in sorted(by_item)}}
    return {"factors": factors}
