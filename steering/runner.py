"""Batched forward work for extraction and evaluation, routed through the engine so the
model stays owned by its one worker (and shares its batches with live traffic)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Callable

import torch

from steering.adapters import Adapter
from steering.engine import Engine, GenerationRequest, PrefillDone
from steering.output import Finished, TokenDelta, generate_text
from steering.sampling import SamplingParams
from steering.steer import RowSteering

Progress = Callable[[int], None]


@dataclass
class ProbedAnswer:
    """A greedy answer with what a monitor sees of it at one layer: the last prompt token's
    projection (before any token) and each generated token's projection as it is read back."""

    text: str
    prompt_projection: float
    token_projections: list[float]


class EngineRunner:
    """Submit many prefill-only or generation requests and collect what extraction needs.
    With ``adapter``, every request runs with that LoRA adapter (the same tools measure it).

    Example::

        runner = EngineRunner(engine)
        means = await runner.span_means([ids], [start])     # [1, L+1, hidden]
        answers = await runner.generate([ids], max_new_tokens=32)
        scores = await runner.token_logprobs([ids], [start])  # [[log p(ids[i] | ids[:i]) for i >= start]]
    """

    def __init__(self, engine: Engine, progress: Progress | None = None, adapter: Adapter | None = None):
        self.engine = engine
        self.adapter = adapter
        self.num_layers = engine.lm.num_layers
        self.progress = progress or (lambda _n: None)
        self._chunk = max(1, min(engine.max_batch_size, engine.max_waiting or 1))

    async def _chunked(self, items: list, one) -> list:
        """``one(item)`` for every item, results in order, at most a full batch in flight: a row
        that finishes early makes room for the next item at once (no waiting for the slowest row
        of a chunk). The first failure cancels the others and is raised."""
        slots = asyncio.Semaphore(self._chunk)

        async def guarded(item):
            async with slots:
                result = await one(item)
            self.progress(1)
            return result

        # A TaskGroup cancels the rest when one fails: a failed job stops feeding the engine.
        # Callers map single errors (a deadline, a full queue) to answers, so raise the first.
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(guarded(item)) for item in items]
        except BaseExceptionGroup as failed:
            raise failed.exceptions[0] from None
        return [task.result() for task in tasks]

    async def _prefill(self, request: GenerationRequest) -> PrefillDone:
        """Run a prefill-only ``request`` and return what its prefill reported."""
        async for event in self.engine.generate(request):
            if isinstance(event, PrefillDone):
                return event
        raise RuntimeError("the prefill returned no result")

    def _prefill_only(self, ids: list[int], **capture) -> GenerationRequest:
        return GenerationRequest(prompt_ids=ids, sampling=SamplingParams(max_new_tokens=0), adapter=self.adapter,
                                 **capture)

    async def span_means(self, prompts: list[list[int]], starts: list[int]) -> torch.Tensor:
        """Mean state over ``prompt[start:]`` at every layer: ``[n, num_layers + 1, hidden]``."""

        async def one(item):
            ids, start = item
            return (await self._prefill(self._prefill_only(ids, mean_from=start))).span_mean

        return torch.stack(await self._chunked(list(zip(prompts, starts)), one))

    async def token_logprobs(self, prompts: list[list[int]], starts: list[int]) -> list[list[float]]:
        """Log-probability of each token of ``prompt[start:]`` given the tokens before it, read
        unsteered (teacher-forced): the model's likelihood of a text it did not write."""

        async def one(item):
            ids, start = item
            return (await self._prefill(self._prefill_only(ids, score_from=start))).prompt_logprobs

        return await self._chunked(list(zip(prompts, starts)), one)

    async def last_states(self, prompts: list[list[int]], layers: list[int] | None = None) -> torch.Tensor:
        """Last prompt token's state at ``layers`` (default every layer): ``[n, len(layers), hidden]``."""
        layers = list(range(self.num_layers + 1)) if layers is None else layers

        async def one(ids):
            event = await self._prefill(self._prefill_only(ids, capture_layers=frozenset(layers)))
            return torch.stack([event.states[layer] for layer in layers])

        return torch.stack(await self._chunked(prompts, one))

    async def option_logprobs(
        self, prompts: list[list[int]], options: list[tuple[int, ...]], *, steering: RowSteering | None = None
    ) -> list[list[float]]:
        """Next-token log-probabilities of each prompt's option tokens, under one steering."""

        async def one(item):
            ids, option_ids = item
            event = await self._prefill(self._prefill_only(ids, steering=steering, option_ids=option_ids))
            return event.option_logprobs

        return await self._chunked(list(zip(prompts, options)), one)

    async def generate(
        self, prompts: list[list[int]], *, steering: RowSteering | None = None, max_new_tokens: int = 32
    ) -> list[str]:
        """Greedy answers (text) to each prompt under one steering."""

        async def one(ids):
            req = GenerationRequest(prompt_ids=ids, steering=steering, adapter=self.adapter,
                                    sampling=SamplingParams(max_new_tokens=max_new_tokens, temperature=0))
            async for event in generate_text(self.engine, req, self.engine.lm.tokenizer):
                if isinstance(event, Finished):
                    return event.text
            raise RuntimeError("generation returned no result")

        return await self._chunked(prompts, one)

    async def probed_answers(self, prompts: list[list[int]], layer: int, unit: torch.Tensor, *,
                             max_new_tokens: int = 48) -> list[ProbedAnswer]:
        """Greedy answers, unsteered, with ``unit``'s projections at ``layer`` taken during the
        same forward passes (the engine's ``probes`` and ``response_probes``)."""
        probe = {layer: unit.reshape(1, -1)}

        async def one(ids):
            req = GenerationRequest(prompt_ids=ids, probes=probe, response_probes=probe, adapter=self.adapter,
                                    sampling=SamplingParams(max_new_tokens=max_new_tokens, temperature=0))
            prompt, tokens = None, []
            async for event in generate_text(self.engine, req, self.engine.lm.tokenizer):
                if isinstance(event, PrefillDone):
                    prompt = event.projections[layer][0]
                elif isinstance(event, TokenDelta):
                    tokens += [t.projections[layer][0] for t in event.logprobs if t.projections]
                elif isinstance(event, Finished):
                    return ProbedAnswer(event.text, prompt, tokens)
            raise RuntimeError("generation returned no result")

        return await self._chunked(prompts, one)
