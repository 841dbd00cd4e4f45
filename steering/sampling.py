"""Next-token choice for a whole step at once, on the model's device, each row with its own
parameters: greedy, temperature, top-k, top-p, min-p, penalties, logit bias and log-probabilities.

A seeded row draws its noise from its own generator, so it picks the same tokens whatever
else shares its batch. Only ``[rows]`` token ids (and the asked-for log-probabilities) are
copied back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Below this a temperature is treated as greedy, as vLLM does: dividing logits by 1e-38 overflows.
SAMPLING_EPS = 1e-5
# Seeds are given to torch.Generator.manual_seed, which takes the unsigned 64-bit range.
MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks tokens and when the engine stops it.

    Follows vLLM: ``temperature`` below 1e-5 is greedy; ``top_k`` 0 means off; EOS and
    ``stop_token_ids`` are masked until ``min_tokens`` tokens exist; ``ignore_eos`` never
    ends on EOS; ``repetition_penalty`` applies to prompt and output tokens, the presence and
    frequency penalties to output tokens only; ``logprobs`` (``None`` for none) is how many top
    alternatives to report beside each chosen token, from the model's raw distribution.
    ``stop`` strings are the output processor's business; the engine stops on token ids.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def filtered(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A generator on ``device`` seeded with ``seed`` (None: use the global one)."""
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


@dataclass
class RowState:
    """What the sampler needs about one row at this step."""

    params: SamplingParams
    generator: torch.Generator | None
    prompt_ids: list[int]
    output_ids: list[int]
    block_ids: tuple[int, ...] = ()  # token ids this row may not pick now (EOS before min_tokens)


@dataclass
class Picked:
    """The sampler's answer for one row."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


def _penalize(logits: torch.Tensor, row: RowState) -> None:
    p = row.params
    vocab = logits.shape[-1]
    device = logits.device
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(row.prompt_ids + row.output_ids, dtype=torch.long, device=device).clamp_(0, vocab - 1)
        picked = logits.index_select(0, seen)
        logits.index_copy_(0, seen, torch.where(picked > 0, picked / p.repetition_penalty,
                                                picked * p.repetition_penalty))
    if row.output_ids and (p.presence_penalty or p.frequency_penalty):
        counts = torch.bincount(torch.tensor(row.output_ids, dtype=torch.long, device=device).clamp_(0, vocab - 1),
                                minlength=vocab).to(logits.dtype)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def _filter(scaled: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Mask (to -inf) what top-k, top-p and min-p exclude, per row of ``scaled`` [n, vocab]."""
    n, vocab = scaled.shape
    device = scaled.device
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    if min(ks) < vocab:
        kmax = max(k for k in ks if k < vocab)
        top = torch.topk(scaled, kmax, dim=-1).values
        kth = top.gather(1, (torch.tensor(ks, device=device).clamp(max=kmax) - 1)[:, None])
        kth = torch.where(torch.tensor([k < vocab for k in ks], device=device)[:, None], kth,
                          torch.full_like(kth, float("-inf")))
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if any(p.min_p > 0.0 for p in params):
        probs = torch.softmax(scaled, dim=-1)
        floor = torch.tensor([p.min_p for p in params], device=device, dtype=probs.dtype)[:, None]
        scaled = scaled.masked_fill(probs < floor * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    if any(p.top_p < 1.0 for p in params):
        top_p = torch.tensor([p.top_p for p in params], device=device, dtype=torch.float32)[:, None]
        ordered, order = torch.sort(scaled, dim=-1, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        scaled = scaled.scatter(1, order, ordered.masked_fill(drop, float("-inf")))
    return scaled


def sample(logits: torch.Tensor, rows: list[RowState]) -> list[Picked]:
    """Choose one token per row of ``logits`` [rows, vocab] (any float dtype, any device).

    Example::

        picked = sample(logits, [RowState(SamplingParams(temperature=0), None, prompt, [])])
        picked[0].token
    """
    logits = logits.float()
    want_logprobs = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    raw = torch.log_softmax(logits.index_select(0, torch.tensor(want_logprobs, device=logits.device)), dim=-1) \
        if want_logprobs else None
    for i, row in enumerate(rows):
        p = row.params
        if p.logit_bias:
            ids = torch.tensor([t for t, _ in p.logit_bias], dtype=torch.long, device=logits.device)
            logits[i].index_add_(0, ids, torch.tensor([b for _, b in p.logit_bias], device=logits.device))
        if p.penalized:
            _penalize(logits[i], row)
        if row.block_ids:
            logits[i, list(row.block_ids)] = float("-inf")
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if sampled:
        index = torch.tensor(sampled, device=logits.device)
        params = [rows[i].params for i in sampled]
        temps = torch.tensor([p.temperature for p in params], device=logits.device)[:, None]
        scaled = logits.index_select(0, index) / temps
        if any(p.filtered for p in params):
            scaled = _filter(scaled, params)
        probs = torch.softmax(scaled, dim=-1)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p; each seeded row uses its own noise.
        noise = torch.empty_like(probs).exponential_()
        for j, i in enumerate(sampled):
            if rows[i].generator is not None:
                noise[j].exponential_(generator=rows[i].generator)
        tokens.index_copy_(0, index, (probs / noise).argmax(dim=-1))
    chosen = tokens.tolist()
    out = [Picked(token=t) for t in chosen]
    if raw is not None:
        k = max(rows[i].params.logprobs for i in want_logprobs)
        picked_lp = raw.gather(1, torch.tensor([chosen[i] for i in want_logprobs], device=raw.device)[:, None])
        picked_lp = picked_lp[:, 0].tolist()
        top_vals, top_ids = (torch.topk(raw, k, dim=-1) if k else (None, None))
        top_vals = top_vals.tolist() if k else None
        top_ids = top_ids.tolist() if k else None
        for j, i in enumerate(want_logprobs):
            n = rows[i].params.logprobs
            out[i].logprob = picked_lp[j]
            out[i].top = list(zip(top_ids[j][:n], top_vals[j][:n])) if n else []
    return out


def option_logprobs(logits: torch.Tensor, option_ids: tuple[int, ...]) -> list[float]:
    """Log-probabilities of ``option_ids`` under one row's next-token ``logits`` [vocab]."""
    return torch.log_softmax(logits.float(), dim=-1)[list(option_ids)].tolist()
