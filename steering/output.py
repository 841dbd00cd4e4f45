"""Per-request output processing: the engine's token ids become text, in the consumer's event loop.

The engine only moves token ids (:mod:`steering.engine`). For each request this module
detokenizes incrementally, cuts at stop strings, enforces the deadline, lets a response
watcher stop the generation, and ends the engine's work (by closing its stream) as soon as
the request is over on this side.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from steering.detokenize import TextStream
from steering.engine import DeadlineExceededError, Done, GenerationRequest, PrefillDone, TokenOut


@dataclass
class TokenDelta:
    """Newly final text and the tokens that produced it (with log-probabilities when asked)."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenOut] = field(default_factory=list)


@dataclass
class Finished:
    finish_reason: str  # "stop" | "length" | "content_filter"
    text: str
    prompt_tokens: int
    completion_tokens: int


Watch = Callable[[dict[int, list[float]]], bool]


async def generate_text(engine, request: GenerationRequest, tokenizer, *,
                        watch: Watch | None = None) -> AsyncIterator[PrefillDone | TokenDelta | Finished]:
    """Run ``request`` on ``engine`` and yield PrefillDone, TokenDelta*, Finished.

    ``watch`` gets each generated token's probe projections; when it returns True the
    generation ends with ``finish_reason: content_filter``. Closing this stream cancels the
    request in the engine.

    Example::

        async for event in generate_text(engine, GenerationRequest(prompt_ids=ids), lm.tokenizer):
            if isinstance(event, TokenDelta):
                print(event.text, end="")
    """
    params = request.sampling
    text = TextStream(tokenizer, params.stop)
    deadline = time.monotonic() + request.timeout_s if request.timeout_s else None
    eos = frozenset() if params.ignore_eos else frozenset(getattr(engine.lm, "eos_token_ids", ()))
    ends = eos | frozenset(params.stop_token_ids)
    held: list[TokenOut] = []
    generated = 0
    events = engine.generate(request)

    def delta(chunk: str) -> TokenDelta:
        out = TokenDelta(chunk, [t.token_id for t in held], list(held))
        held.clear()
        return out

    def finished(reason: str, completion_tokens: int) -> Finished:
        return Finished(reason, text.text, len(request.prompt_ids), completion_tokens)

    try:
        async for event in events:
            if deadline is not None and time.monotonic() > deadline:
                raise DeadlineExceededError(f"request exceeded its deadline of {request.timeout_s:g} s")
            if isinstance(event, PrefillDone):
                yield event
            elif isinstance(event, TokenOut):
                held.append(event)
                generated += 1
                # A token that ends the request (EOS, a stop token id) adds no text.
                new = "" if event.token_id in ends else text.push(event.token_id)
                if text.stopped:
                    yield delta(new)
                    yield finished("stop", generated)
                    return
                if watch is not None and event.projections and watch(event.projections):
                    yield delta(new + text.flush())
                    yield finished("content_filter", generated)
                    return
                if new:
                    yield delta(new)
            elif isinstance(event, Done):
                tail = text.flush()
                if tail or held:
                    yield delta(tail)
                yield finished(event.finish_reason, event.completion_tokens)
                return
    finally:
        await events.aclose()
