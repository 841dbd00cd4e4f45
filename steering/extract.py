"""Building persona vectors from a trait definition (``vectors/traits/NAME.json``).

Method implemented here: **contrastive texts**. The definition pairs a question with a
positive and a negative answer; both are teacher-forced after the question, and the vector
is mean(response-token states | positive) - mean(... | negative), for every layer at once.
Small models follow persona system prompts poorly, so written answers give a cleaner
contrast than the model's own.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from steering.activations import last_prompt_states, response_means
from steering.chat import chat_prompt_ids, text_ids
from steering.model import LoadedModel
from steering.vector import ModelRef, PersonaVector


@dataclass
class TraitDefinition:
    """A trait as written in ``vectors/traits/NAME.json``."""

    name: str
    description: str
    pairs: list[dict]
    questions: list[str]
    heldout_questions: list[str]
    texts: list[dict]
    neutral_prompts: list[str]
    digest: str

    @classmethod
    def load(cls, path: Path) -> "TraitDefinition":
        raw = Path(path).read_bytes()
        data = json.loads(raw)
        return cls(
            name=data["name"],
            description=data["description"],
            pairs=data.get("pairs", []),
            questions=data.get("questions", []),
            heldout_questions=data.get("heldout_questions", []),
            texts=data.get("texts", []),
            neutral_prompts=data.get("neutral_prompts", []),
            digest=definition_hash(data),
        )


def definition_hash(data: dict) -> str:
    """Hash of a definition's content (key order and whitespace do not matter)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _user(q: str) -> list[dict]:
    return [{"role": "user", "content": q}]


def _with_system(system: str, q: str) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": q}]


def cohens_d(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Effect size along the last axis' batch dimension: ``pos``/``neg`` are ``[n, ...]``."""
    pooled = ((pos.var(dim=0) + neg.var(dim=0)) / 2).clamp_min(1e-12).sqrt()
    return (pos.mean(dim=0) - neg.mean(dim=0)) / pooled


def build_from_texts(lm: LoadedModel, trait: TraitDefinition, *, coefficient_range: tuple[float, float]) -> PersonaVector:
    """Extract ``trait``'s vector for ``lm`` by the contrastive-texts method.

    Also records the residual norm per layer and the neutral-prompt projection statistics
    (for z-scores), and picks the recommended layer as the one where held-out questions under
    the positive vs negative system prompts separate best (Cohen's d of the last prompt
    token's projection), within the middle of the network.
    """
    tok = lm.tokenizer
    prompts = [chat_prompt_ids(tok, _user(t["question"])) for t in trait.texts]
    pos = response_means(lm, prompts, [text_ids(tok, t["pos"]) for t in trait.texts])
    neg = response_means(lm, prompts, [text_ids(tok, t["neg"]) for t in trait.texts])
    directions = pos.mean(dim=0) - neg.mean(dim=0)  # [L+1, H]

    unit = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    neutral = last_prompt_states(lm, [chat_prompt_ids(tok, _user(p)) for p in trait.neutral_prompts])
    neutral_proj = (neutral * unit).sum(-1)  # [n, L+1]
    separation = heldout_separation(lm, trait, unit)

    lo, hi = max(1, math.floor(0.3 * lm.num_layers)), math.ceil(0.75 * lm.num_layers)
    recommended = lo + int(torch.argmax(separation[lo : hi + 1]))
    return PersonaVector(
        name=trait.name,
        directions=directions,
        model=ModelRef(lm.name, lm.fingerprint, lm.num_layers, lm.hidden_size),
        description=trait.description,
        method="contrastive_texts",
        source={
            "definition_sha256": trait.digest,
            "n_pairs": len(trait.texts),
            "n_neutral": len(trait.neutral_prompts),
            "judge": None,
            "note": "no judge filtering: every written pair is used",
        },
        recommended_layer=recommended,
        coefficient_range=coefficient_range,
        stats={
            "residual_norm": neutral.norm(dim=-1).mean(dim=0),
            "neutral_mean": neutral_proj.mean(dim=0),
            "neutral_std": neutral_proj.std(dim=0),
        },
        extra={
            "heldout_cohens_d": [round(float(x), 4) for x in separation],
            "layer_norms": [round(float(x), 4) for x in directions.norm(dim=-1)],
        },
    )


def heldout_separation(lm: LoadedModel, trait: TraitDefinition, unit: torch.Tensor) -> torch.Tensor:
    """Per-layer Cohen's d of last-prompt-token projections, held-out questions, pos vs neg prompts."""
    tok = lm.tokenizer
    pos_prompts, neg_prompts = [], []
    for q in trait.heldout_questions:
        for pair in trait.pairs:
            pos_prompts.append(chat_prompt_ids(tok, _with_system(pair["pos"], q)))
            neg_prompts.append(chat_prompt_ids(tok, _with_system(pair["neg"], q)))
    pos = (last_prompt_states(lm, pos_prompts) * unit).sum(-1)
    neg = (last_prompt_states(lm, neg_prompts) * unit).sum(-1)
    d = cohens_d(pos, neg)
    d[0] = float("-inf")  # the embedding row cannot be steered
    return d
