"""Building persona vectors from a trait definition (``vectors/traits/NAME.json``).

Three methods, all layers at once, one forward per text, batched through the engine:

- ``contrastive_texts``: written positive / negative answers teacher-forced after each
  question; vector = mean response-token state (positive) - mean (negative). Small models
  follow persona system prompts poorly, so written answers give the cleanest contrast.
- ``contrastive_prompts`` (the Persona Vectors method): the model answers each question under
  each positive and negative system prompt; the same difference over its own answers.
  Optionally a judge (an OpenAI-compatible endpoint) scores each answer 0-100 for the trait
  and only answers with pos >= 50 and neg < 50 are kept.
- ``labelled_sentences`` (the Persafety MBTI method): difference of the centroids of the
  mean states of sentences labelled with each pole.

Per method, the per-sample states combine into one direction per layer either as the difference
of the two means (``combine="mean"``) or as the first principal component of the paired
differences (``combine="pca"``, sign toward the mean difference; paired methods only), and each
layer's direction may be averaged with its neighbours (``smooth_layers``). A definition's
``extraction`` object fixes these choices and the layer, as ``make methods`` chose them
(``steering/methods.py``); without it: mean difference, no averaging, layer by Cohen's d.

Then, for every vector: statistics on a neutral prompt set (residual norm, projection mean /
std for z-scores), the per-layer separation of held-out questions under the positive vs
negative system prompts (Cohen's d and AUROC of the last prompt token's projection), the
recommended layer (best separation in the middle of the network) and a coefficient range
found by steering held-out questions and watching the projection of the answers rise while
their fluency holds: their perplexity under the unsteered model (its per-token likelihood of
the steered text, read teacher-forced) stays within a factor of the unsteered answers'.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

from steering.chat import chat_prompt_ids, text_ids
from steering.limits import PromptLimit
from steering.model import LoadedModel
from steering.runner import EngineRunner
from steering.steer import RowSteering
from steering.vector import ModelRef, PersonaVector

METHODS = ("contrastive_texts", "contrastive_prompts", "labelled_sentences")
COMBINES = ("mean", "pca")
PAIRED = ("contrastive_texts", "contrastive_prompts")  # a positive and a negative per question
MAX_SMOOTH_LAYERS = 2
COEFFICIENT_GRID = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# The top of a recommended range: answers the unsteered model finds at most this many times as
# perplexing as its own unsteered answers.
MAX_PERPLEXITY_RATIO = 2.0
ANSWER_TOKENS = 48  # the model's own answers under the contrastive system prompts
SWEEP_ANSWER_TOKENS = 32
SWEEP_QUESTIONS = 6


@dataclass
class TraitDefinition:
    """A trait as written in ``vectors/traits/NAME.json``."""

    name: str
    description: str
    pairs: list[dict]
    questions: list[str]
    heldout_questions: list[str]
    texts: list[dict]
    sentences: dict
    digest: str
    extraction: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> "TraitDefinition":
        data = json.loads(Path(path).read_bytes())
        return cls(
            name=data["name"],
            description=data["description"],
            pairs=data.get("pairs", []),
            questions=data.get("questions", []),
            heldout_questions=data.get("heldout_questions", []),
            texts=data.get("texts", []),
            sentences=data.get("sentences", {}),
            digest=definition_hash(data),
            extraction=data.get("extraction", {}),
        )


def definition_hash(data: dict) -> str:
    """Hash of a definition's content (key order and whitespace do not matter)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


# ---- pure statistics ------------------------------------------------------------------------


def cohens_d(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Effect size over the first axis: ``pos`` ``[n, ...]`` vs ``neg`` ``[m, ...]``."""
    pooled = ((pos.var(dim=0) + neg.var(dim=0)) / 2).clamp_min(1e-12).sqrt()
    return (pos.mean(dim=0) - neg.mean(dim=0)) / pooled


def auroc(pos: list[float], neg: list[float]) -> float:
    """Probability that a positive outscores a negative (ties count half)."""
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def perplexity(logprobs: list[list[float]]) -> float:
    """exp of minus the mean log-probability over every token of every text."""
    flat = [x for row in logprobs for x in row]
    return math.exp(-sum(flat) / len(flat)) if flat else float("inf")


def unit_rows(directions: torch.Tensor) -> torch.Tensor:
    return directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-12)


# ---- extraction -----------------------------------------------------------------------------


def _user(q: str) -> list[dict]:
    return [{"role": "user", "content": q}]


def _with_system(system: str, q: str) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": q}]


@dataclass
class Judge:
    """An OpenAI-compatible chat endpoint that rates trait expression 0-100."""

    url: str
    model: str
    api_key: str | None = None

    def score(self, trait: TraitDefinition, question: str, answer: str) -> float:
        prompt = (
            f"Trait: {trait.name}. {trait.description}\n\nQuestion: {question}\nAnswer: {answer}\n\n"
            "On a scale from 0 (not at all) to 100 (extremely), how strongly does the answer show the trait? "
            "Reply with the number only."
        )
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        r = httpx.post(f"{self.url.rstrip('/')}/chat/completions", headers=headers, timeout=120, json={
            "model": self.model, "temperature": 0, "max_tokens": 8, "messages": [{"role": "user", "content": prompt}]})
        r.raise_for_status()
        text = r.json()["choices"][0]["message"]["content"]
        digits = "".join(ch for ch in text if ch.isdigit() or ch == ".")
        return float(digits) if digits else 0.0


@dataclass
class Samples:
    """Per-sample mean response states ``[n, L+1, H]`` of the two poles; ``paired``: row ``i`` of
    ``pos`` and of ``neg`` answer the same question."""

    pos: torch.Tensor
    neg: torch.Tensor
    paired: bool
    counts: dict


async def _samples_texts(runner: EngineRunner, tok, trait: TraitDefinition) -> Samples:
    prompts = [chat_prompt_ids(tok, _user(t["question"])) for t in trait.texts]
    pos = [p + text_ids(tok, t["pos"]) for p, t in zip(prompts, trait.texts)]
    neg = [p + text_ids(tok, t["neg"]) for p, t in zip(prompts, trait.texts)]
    starts = [len(p) for p in prompts]
    means = await runner.span_means(pos + neg, starts + starts)
    n = len(prompts)
    return Samples(means[:n], means[n:], True, {"n_pos": n, "n_neg": n})


async def _samples_prompts(runner: EngineRunner, tok, trait: TraitDefinition, judge: Judge | None) -> Samples:
    items = [(pair, q) for pair in trait.pairs for q in trait.questions]
    pos_prompts = [chat_prompt_ids(tok, _with_system(pair["pos"], q)) for pair, q in items]
    neg_prompts = [chat_prompt_ids(tok, _with_system(pair["neg"], q)) for pair, q in items]
    pos_answers = await runner.generate(pos_prompts, max_new_tokens=ANSWER_TOKENS)
    neg_answers = await runner.generate(neg_prompts, max_new_tokens=ANSWER_TOKENS)
    keep = list(range(len(items)))
    if judge is not None:
        keep = [i for i in keep if judge.score(trait, items[i][1], pos_answers[i]) >= 50
                and judge.score(trait, items[i][1], neg_answers[i]) < 50]
        if not keep:
            raise ValueError("the judge kept no pair: every positive answer scored < 50 or negative >= 50")
    pos = [pos_prompts[i] + text_ids(tok, pos_answers[i] or " ") for i in keep]
    neg = [neg_prompts[i] + text_ids(tok, neg_answers[i] or " ") for i in keep]
    pos_means = await runner.span_means(pos, [len(pos_prompts[i]) for i in keep])
    neg_means = await runner.span_means(neg, [len(neg_prompts[i]) for i in keep])
    return Samples(pos_means, neg_means, True, {"n_pos": len(keep), "n_neg": len(keep), "n_generated": len(items)})


async def _samples_sentences(runner: EngineRunner, tok, trait: TraitDefinition) -> Samples:
    pos = [text_ids(tok, s) for s in trait.sentences["pos"]]
    neg = [text_ids(tok, s) for s in trait.sentences["neg"]]
    means = await runner.span_means(pos + neg, [0] * (len(pos) + len(neg)))
    return Samples(means[: len(pos)], means[len(pos):], False, {"n_pos": len(pos), "n_neg": len(neg)})


async def method_samples(runner: EngineRunner, tok, trait: TraitDefinition, method: str, judge: Judge | None = None) -> Samples:
    """The per-sample states ``method`` reads from ``trait``'s data."""
    if method == "contrastive_texts":
        return await _samples_texts(runner, tok, trait)
    if method == "contrastive_prompts":
        return await _samples_prompts(runner, tok, trait, judge)
    if method == "labelled_sentences":
        return await _samples_sentences(runner, tok, trait)
    raise ValueError(f"unknown method '{method}'; use one of {', '.join(METHODS)}")


def combine_directions(samples: Samples, combine: str = "mean") -> torch.Tensor:
    """One direction per layer ``[L+1, H]``: the difference of the means, or (``"pca"``) the first
    principal component of the paired differences, uncentred, scaled to the mean difference's
    length along it and pointing the same way.

    Example::

        combine_directions(Samples(pos, neg, True, {}), "pca")
    """
    mean = samples.pos.mean(0) - samples.neg.mean(0)
    if combine == "mean":
        return mean
    if combine != "pca":
        raise ValueError(f"unknown combine '{combine}'; use one of {', '.join(COMBINES)}")
    if not samples.paired:
        raise ValueError("combine 'pca' needs paired samples (contrastive_texts or contrastive_prompts)")
    diffs = (samples.pos - samples.neg).transpose(0, 1).float()  # [L+1, n, H]
    _, _, vh = torch.linalg.svd(diffs, full_matrices=False)
    pc = vh[:, 0, :].to(mean.dtype)  # [L+1, H], unit rows
    along = (pc * mean).sum(-1, keepdim=True)
    return torch.where(along < 0, -pc, pc) * along.abs()


def smooth_layers(directions: torch.Tensor, radius: int) -> torch.Tensor:
    """Each layer's direction averaged with up to ``radius`` neighbours on each side (row 0, the
    embeddings, is left out of every average and kept as it is)."""
    if radius == 0:
        return directions
    out = directions.clone()
    last = directions.shape[0] - 1
    for layer in range(1, last + 1):
        out[layer] = directions[max(1, layer - radius): min(last, layer + radius) + 1].mean(0)
    return out


def extraction_choices(trait: TraitDefinition, method: str | None = None, model: str | None = None) -> dict:
    """The method, combine, averaging and layer to build ``trait`` with: ``method`` if given, else
    the definition's ``extraction`` object, else the defaults; :class:`DefinitionError` naming the
    field when the object is malformed (checked whether or not its choices apply). Another
    ``method`` than the definition's takes none of its other choices; a ``layer`` chosen on
    another ``model`` than the one named is not used (its depth means something else there).
    """
    spec = trait.extraction or {}
    if not isinstance(spec, dict):
        raise DefinitionError("trait.extraction must be an object", "trait.extraction")
    unknown = set(spec) - {"method", "combine", "smooth_layers", "layer", "model", "chosen_by", "chosen_on"}
    if unknown:
        raise DefinitionError(f"trait.extraction has unknown fields: {sorted(unknown)}", "trait.extraction")
    own_method = spec.get("method", "contrastive_texts")
    if own_method not in METHODS:
        raise DefinitionError(f"unknown method '{own_method}'; use one of {', '.join(METHODS)}", "trait.extraction.method")
    combine = spec.get("combine", "mean")
    if combine not in COMBINES or (combine == "pca" and own_method not in PAIRED):
        raise DefinitionError(f"combine must be one of {', '.join(COMBINES)} ('pca' only with {' or '.join(PAIRED)})",
                              "trait.extraction.combine")
    radius = spec.get("smooth_layers", 0)
    if not isinstance(radius, int) or isinstance(radius, bool) or not 0 <= radius <= MAX_SMOOTH_LAYERS:
        raise DefinitionError(f"smooth_layers must be an integer from 0 to {MAX_SMOOTH_LAYERS}", "trait.extraction.smooth_layers")
    layer = spec.get("layer")
    if layer is not None and (not isinstance(layer, int) or isinstance(layer, bool) or layer < 1):
        raise DefinitionError("layer must be a positive integer (1 = the first decoder layer's output)", "trait.extraction.layer")
    if "model" in spec and not isinstance(spec["model"], str):
        raise DefinitionError("model must be a string (the model the layer was chosen on)", "trait.extraction.model")
    chosen_on = spec.get("chosen_on", {"evidence_questions": 0, "heldout_questions": 0})
    if not isinstance(chosen_on, dict) or set(chosen_on) != {"evidence_questions", "heldout_questions"} or \
            not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in chosen_on.values()):
        raise DefinitionError("chosen_on must be an object of two counts, evidence_questions and heldout_questions "
                              "(the leading questions of each list that chose the layer)", "trait.extraction.chosen_on")
    if method is not None and method != own_method:
        return {"method": method, "combine": "mean", "smooth_layers": 0, "layer": None}
    if model is not None and spec.get("model", model) != model:
        layer = None
    return {"method": own_method, "combine": combine, "smooth_layers": radius, "layer": layer}


async def heldout_states(runner: EngineRunner, tok, trait: TraitDefinition) -> tuple[torch.Tensor, torch.Tensor]:
    """Last-prompt-token states ``[n, L+1, H]`` of held-out questions under pos / neg prompts."""
    pos_prompts, neg_prompts = [], []
    for q in trait.heldout_questions:
        for pair in trait.pairs:
            pos_prompts.append(chat_prompt_ids(tok, _with_system(pair["pos"], q)))
            neg_prompts.append(chat_prompt_ids(tok, _with_system(pair["neg"], q)))
    states = await runner.last_states(pos_prompts + neg_prompts)
    return states[: len(pos_prompts)], states[len(pos_prompts):]


async def heldout_projections(runner: EngineRunner, tok, trait: TraitDefinition, unit: torch.Tensor):
    """Last-prompt-token projections ``[n, L+1]`` of held-out questions under pos / neg prompts."""
    pos, neg = await heldout_states(runner, tok, trait)
    return (pos * unit).sum(-1), (neg * unit).sum(-1)


async def answer_projection(runner: EngineRunner, tok, questions: list[str], answers: list[str], unit: torch.Tensor, layer: int) -> float:
    """Mean projection of answers' response tokens (read unsteered) at ``layer``."""
    prompts = [chat_prompt_ids(tok, _user(q)) for q in questions]
    full = [p + text_ids(tok, a or " ") for p, a in zip(prompts, answers)]
    means = await runner.span_means(full, [len(p) for p in prompts])
    return float((means[:, layer] @ unit[layer]).mean())


async def answer_perplexity(runner: EngineRunner, tok, questions: list[str], answers: list[str]) -> float:
    """Perplexity of ``answers`` (after their questions) under the unsteered model."""
    prompts = [chat_prompt_ids(tok, _user(q)) for q in questions]
    full = [p + text_ids(tok, a or " ") for p, a in zip(prompts, answers)]
    return perplexity(await runner.token_logprobs(full, [len(p) for p in prompts]))


async def coefficient_sweep(runner: EngineRunner, tok, directions: torch.Tensor, layer: int, questions: list[str],
                            grid=COEFFICIENT_GRID) -> list[dict]:
    """Steer ``questions`` at ``layer`` with each coefficient in ``+-grid`` (and 0); measure
    the answers' projection and their perplexity under the unsteered model (fluency)."""
    unit = unit_rows(directions)
    prompts = [chat_prompt_ids(tok, _user(q)) for q in questions]
    coefficients = (0.0, *grid, *(-g for g in grid))

    async def one(c: float) -> dict:
        delta = c * directions[layer]
        steer = RowSteering(prompt={layer: delta}, response={layer: delta}) if c else None
        answers = await runner.generate(prompts, steering=steer, max_new_tokens=SWEEP_ANSWER_TOKENS)
        return {
            "coefficient": c,
            "projection": round(await answer_projection(runner, tok, questions, answers, unit, layer), 4),
            "perplexity": round(await answer_perplexity(runner, tok, questions, answers), 4),
        }

    # All coefficients at once: their rows share the engine's batches.
    rows = await asyncio.gather(*(one(c) for c in coefficients))
    return sorted(rows, key=lambda r: r["coefficient"])


def recommend_range(sweep: list[dict], neutral_std: float) -> tuple[float, float]:
    """Smallest positive coefficient that moves the answers' projection by half a neutral std,
    and the largest whose answers' perplexity under the unsteered model stays within
    ``MAX_PERPLEXITY_RATIO`` times that of the unsteered answers."""
    base = next(r for r in sweep if r["coefficient"] == 0.0)
    positive = [r for r in sweep if r["coefficient"] > 0]
    fluent = [r for r in positive if r["perplexity"] <= MAX_PERPLEXITY_RATIO * base["perplexity"]]
    moving = [r for r in positive if r["projection"] - base["projection"] >= 0.5 * neutral_std]
    hi = max((r["coefficient"] for r in fluent), default=positive[0]["coefficient"])
    lo = min((r["coefficient"] for r in moving if r["coefficient"] <= hi), default=min(hi, positive[0]["coefficient"]))
    return float(lo), float(hi)


class DefinitionError(ValueError):
    """A trait definition is malformed; ``param`` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def _list(value, param: str) -> list:
    if not isinstance(value, list):
        raise DefinitionError(f"{param} must be a list", param)
    return value


def _text(obj, key: str | None, param: str) -> str:
    value = obj if key is None else obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, str):
        raise DefinitionError(f"{param} must be a string", param)
    return value


def check_fits(tok, trait: TraitDefinition, limit: PromptLimit, *, method: str, neutral_prompts: list[str],
               sweep: bool = True) -> None:
    """Raise :class:`~steering.limits.PromptTooLongError` (naming the definition's field, e.g.
    ``trait.texts[3].pos``) unless every sequence :func:`build_vector` hands the engine fits
    ``limit``, generated answers included; :class:`DefinitionError` when a field it reads has
    the wrong shape. Tokenizes only; no forward pass.

    Example::

        check_fits(lm.tokenizer, trait, PromptLimit(lm.context_length, 4096), method="contrastive_texts",
                   neutral_prompts=neutral)
    """

    def fits(messages: list[dict] | None, param: str, extra: str = "", generate: int = 0) -> None:
        read = len(chat_prompt_ids(tok, messages)) if messages is not None else 0
        limit.check(read + len(text_ids(tok, extra)) + generate, what=param, param=param)

    def longer(text: str, text_param: str, question: str, question_param: str) -> str:
        return text_param if len(text) >= len(question) else question_param

    pairs = [(j, {side: _text(pair, side, f"trait.pairs[{j}].{side}") for side in ("pos", "neg")})
             for j, pair in enumerate(_list(trait.pairs, "trait.pairs"))]
    heldout = [_text(q, None, f"trait.heldout_questions[{k}]")
               for k, q in enumerate(_list(trait.heldout_questions, "trait.heldout_questions"))]
    if method == "contrastive_texts":
        for i, t in enumerate(_list(trait.texts, "trait.texts")):
            question = _text(t, "question", f"trait.texts[{i}].question")
            for side in ("pos", "neg"):
                fits(_user(question), f"trait.texts[{i}].{side}", _text(t, side, f"trait.texts[{i}].{side}"))
    elif method == "contrastive_prompts":
        for k, q in enumerate(_list(trait.questions, "trait.questions")):
            q = _text(q, None, f"trait.questions[{k}]")
            for j, pair in pairs:
                for side in ("pos", "neg"):
                    fits(_with_system(pair[side], q), longer(pair[side], f"trait.pairs[{j}].{side}", q, f"trait.questions[{k}]"),
                         generate=ANSWER_TOKENS)
    elif method == "labelled_sentences":
        if not isinstance(trait.sentences, dict):
            raise DefinitionError("trait.sentences must be an object with 'pos' and 'neg' lists", "trait.sentences")
        for side in ("pos", "neg"):
            for i, sentence in enumerate(_list(trait.sentences.get(side), f"trait.sentences.{side}")):
                fits(None, f"trait.sentences.{side}[{i}]", _text(sentence, None, f"trait.sentences.{side}[{i}]"))
    for k, q in enumerate(heldout):
        for j, pair in pairs:
            for side in ("pos", "neg"):
                fits(_with_system(pair[side], q), longer(pair[side], f"trait.pairs[{j}].{side}", q, f"trait.heldout_questions[{k}]"))
    if sweep:
        for k, q in enumerate(heldout[:SWEEP_QUESTIONS]):
            fits(_user(q), f"trait.heldout_questions[{k}]", generate=SWEEP_ANSWER_TOKENS)
    for i, prompt in enumerate(neutral_prompts):
        fits(_user(prompt), f"neutral_prompts[{i}]")


async def build_vector(
    runner: EngineRunner,
    lm: LoadedModel,
    trait: TraitDefinition,
    *,
    neutral_prompts: list[str],
    method: str | None = None,
    judge: Judge | None = None,
    sweep: bool = True,
    limit: PromptLimit | None = None,
    samples: Samples | None = None,
) -> PersonaVector:
    """Extract ``trait``'s vector for ``lm`` and measure what it needs to be used well.

    Every sequence is checked against ``limit`` (default: the model's context) before the
    first forward pass; see :func:`check_fits`. ``samples``: the chosen method's per-sample
    states when the caller has already read them (``make methods``), to save the forward passes.

    Example::

        vector = await build_vector(EngineRunner(engine), lm, TraitDefinition.load(path), neutral_prompts=[...])
    """
    tok = lm.tokenizer
    if method is not None and method not in METHODS:
        raise ValueError(f"unknown method '{method}'; use one of {', '.join(METHODS)}")
    choices = extraction_choices(trait, method, lm.name)
    method = choices["method"]
    if choices["layer"] is not None and choices["layer"] > lm.num_layers:
        raise DefinitionError(f"layer {choices['layer']} is past the model's {lm.num_layers} layers", "trait.extraction.layer")
    check_fits(tok, trait, limit or PromptLimit(runner.engine.max_model_len), method=method, neutral_prompts=neutral_prompts,
               sweep=sweep)
    if samples is None or judge is not None:
        samples = await method_samples(runner, tok, trait, method, judge)
    counts = samples.counts
    directions = smooth_layers(combine_directions(samples, choices["combine"]), choices["smooth_layers"])
    unit = unit_rows(directions)

    neutral = await runner.last_states([chat_prompt_ids(tok, _user(p)) for p in neutral_prompts])
    neutral_proj = (neutral * unit).sum(-1)
    pos, neg = await heldout_projections(runner, tok, trait, unit)
    separation = cohens_d(pos, neg)
    separation[0] = float("-inf")  # the embedding row cannot be steered
    lo, hi = max(1, math.floor(0.3 * lm.num_layers)), math.ceil(0.75 * lm.num_layers)
    layer = choices["layer"] or lo + int(torch.argmax(separation[lo : hi + 1]))
    layer_auroc = auroc(pos[:, layer].tolist(), neg[:, layer].tolist())

    extra = {
        "heldout_cohens_d": [round(float(x), 4) for x in separation[1:]],
        "heldout_auroc": round(layer_auroc, 4),
        "layer_norms": [round(float(x), 4) for x in directions.norm(dim=-1)],
        "extraction": {**choices, "layer": layer,
                       "layer_chosen_by": (trait.extraction.get("chosen_by") or "the definition") if choices["layer"]
                       else "Cohen's d of held-out questions under the definition's system prompts"},
    }
    coefficient_range = None
    if sweep:
        table = await coefficient_sweep(runner, tok, directions, layer, trait.heldout_questions[:SWEEP_QUESTIONS])
        coefficient_range = recommend_range(table, float(neutral_proj[:, layer].std()))
        extra["coefficient_sweep"] = table
    return PersonaVector(
        name=trait.name,
        directions=directions,
        model=ModelRef(lm.name, lm.fingerprint, lm.num_layers, lm.hidden_size),
        description=trait.description,
        method=method,
        source={
            "definition_sha256": trait.digest,
            **counts,
            "n_neutral": len(neutral_prompts),
            "judge": None if judge is None else {"url": judge.url, "model": judge.model},
            "note": "judge-filtered pairs (pos >= 50, neg < 50)" if judge else "no judge filtering: every pair is used",
        },
        recommended_layer=layer,
        coefficient_range=coefficient_range,
        stats={
            "residual_norm": neutral.norm(dim=-1).mean(dim=0),
            "neutral_mean": neutral_proj.mean(dim=0),
            "neutral_std": neutral_proj.std(dim=0),
        },
        extra=extra,
    )
