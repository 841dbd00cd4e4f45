"""Per-row next-token choice: greedy, temperature and nucleus sampling, each row with its own
parameters and, when seeded, its own random generator (so a seeded request draws the same
tokens whatever else shares its batch)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks tokens and when it stops.

    ``temperature == 0`` is greedy. ``min_tokens`` and ``ignore_eos`` follow vLLM: EOS is
    masked until ``min_tokens`` tokens exist, and never ends the request with ``ignore_eos``.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def pick_token(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
) -> int:
    """Choose the next token from one row's ``logits`` [vocab] (float32)."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        cut = (cumulative - sorted_probs) >= params.top_p
        sorted_probs = sorted_probs.masked_fill(cut, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def pick_tokens(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    *,
    block_eos: list[bool],
    eos_ids: list[int],
) -> list[int]:
    """Choose one token per row of ``logits`` [batch, vocab] (float32; modified in place).

    Greedy rows share one batched argmax; sampled rows draw with their own generator. Rows
    with ``block_eos`` cannot pick an EOS token.
    """
    blocked_rows = [i for i, b in enumerate(block_eos) if b]
    if blocked_rows and eos_ids:
        logits[torch.tensor(blocked_rows)[:, None], torch.tensor(eos_ids)[None, :]] = float("-inf")
    tokens = logits.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        if not p.greedy:
            tokens[i] = pick_token(logits[i], p, generators[i])
    return tokens
