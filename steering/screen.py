"""Training-data screening by projection difference (the Persona Vectors method).

For each sample (a chat whose last assistant message is the training response, or a
prompt / response pair) and each vector, at the vector's layer:

- ``train``: projection of the training response's mean response-token state;
- ``natural``: the same for the model's own greedy answer to the prompt;
- ``diff`` = train - natural: how much further along the persona the sample would pull;
- ``cheap_diff`` = train - projection of the last prompt token (no generation needed).

High values flag samples that would shift the persona if fine-tuned on. Given a runner with an
adapter, every state (and the natural answer) is the adapter's: what the data would do to a
model already fine-tuned with it. The input is read
line by line and processed in chunks, so a large file is never held in memory; a malformed
line, or one whose prompt and response (or natural answer) would not fit the prompt limit, is
reported with its number and skipped (all are counted, the first :data:`MAX_ERRORS` kept).
Reading hands the event loop back every few milliseconds, so a server screening a large
upload keeps answering everyone else.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Iterable, Iterator

import torch

from steering.chat import chat_prompt_ids, text_ids
from steering.engine import GenerationRequest, PrefillDone
from steering.limits import PromptLimit, PromptTooLongError
from steering.output import Finished, generate_text
from steering.runner import EngineRunner
from steering.sampling import SamplingParams
from steering.vector import PersonaVector


# A report keeps the first errors with their line numbers and counts the rest: a malformed
# upload of millions of lines must not grow the job's stored result with it.
MAX_ERRORS = 100
# Longest stretch of parsing and tokenizing between two hand-backs to the event loop.
YIELD_AFTER_S = 0.005


class SampleError(ValueError):
    pass


@dataclass
class Sample:
    line: int
    messages: list[dict]  # the prompt: every message before the training response
    response: str
    prompt_ids: list[int] = field(default_factory=list)
    response_ids: list[int] = field(default_factory=list)


MAX_LINE_BYTES = 1 << 20
"""Longest screened line read whole. A sample that long is far past any model's context, and a
single line of a 256 MB upload must not be decoded, parsed and tokenized in one go."""


def jsonl_lines(path: Path | str, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, str | SampleError]]:
    """``(line number, text)`` for each line of a JSONL file, read in bounded pieces. A line over
    ``max_line_bytes`` is skipped without being held whole and comes back as a :class:`SampleError`
    saying how long it was, so it is reported by number like any other malformed line.

    Example::

        for number, text in jsonl_lines("train.jsonl"):
            ...   # text is str, or SampleError for an over-long line
    """
    with open(path, "rb") as fh:
        number = 0
        while piece := fh.readline(max_line_bytes + 1):
            number += 1
            if len(piece) > max_line_bytes and not piece.endswith(b"\n"):
                size = len(piece)
                while piece and not piece.endswith(b"\n"):
                    piece = fh.readline(max_line_bytes)
                    size += len(piece)
                yield number, SampleError(f"the line is {size} bytes long; lines of at most {max_line_bytes} bytes "
                                          f"are screened")
                continue
            yield number, piece.decode("utf-8", errors="replace")


def parse_line(line_no: int, raw: str) -> Sample | None:
    """One JSONL line to a :class:`Sample`; ``None`` for a blank line; :class:`SampleError` if malformed."""
    if not raw.strip():
        return None
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise SampleError(f"not JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(obj, dict):
        raise SampleError("each line must be a JSON object")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or len(msgs) < 2:
            raise SampleError("'messages' must be a list with a prompt and a final assistant message")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
                raise SampleError(f"messages[{i}] needs a role (system, user, assistant) and string content")
        if msgs[-1]["role"] != "assistant":
            raise SampleError("the last message must be the assistant's (the training response)")
        if not msgs[-1]["content"].strip():
            raise SampleError("the training response is empty")
        return Sample(line_no, msgs[:-1], msgs[-1]["content"])
    if isinstance(obj.get("prompt"), str) and isinstance(obj.get("response"), str) and obj["response"].strip():
        return Sample(line_no, [{"role": "user", "content": obj["prompt"]}], obj["response"])
    raise SampleError("expected {'messages': [...]} or {'prompt': str, 'response': str}")


@dataclass
class ScreenReport:
    """Per-vector running means and top-k samples; per-sample rows are yielded as they come."""

    vectors: list[str]
    top_k: int
    samples: int = 0
    errors: list[dict] = field(default_factory=list)  # the first MAX_ERRORS
    error_count: int = 0
    _sums: dict[str, float] = field(default_factory=dict)
    _cheap_sums: dict[str, float] = field(default_factory=dict)
    _tops: dict[str, list] = field(default_factory=dict)

    def error(self, line: int, message: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS:
            self.errors.append({"line": line, "error": message})

    def add(self, row: dict) -> None:
        self.samples += 1
        for name, s in row["scores"].items():
            key = s["diff"] if s.get("diff") is not None else s["cheap_diff"]
            self._sums[name] = self._sums.get(name, 0.0) + (s["diff"] or 0.0)
            self._cheap_sums[name] = self._cheap_sums.get(name, 0.0) + s["cheap_diff"]
            heap = self._tops.setdefault(name, [])
            item = (key, -row["line"], {"line": row["line"], **s})
            if len(heap) < self.top_k:
                heapq.heappush(heap, item)
            else:
                heapq.heappushpop(heap, item)

    def summary(self, generated: bool) -> dict:
        n = max(1, self.samples)
        return {
            "samples": self.samples,
            "errors": self.errors,
            "error_count": self.error_count,
            "vectors": {
                name: {
                    "mean_diff": round(self._sums.get(name, 0.0) / n, 4) if generated else None,
                    "mean_cheap_diff": round(self._cheap_sums.get(name, 0.0) / n, 4),
                    "top": [item[2] for item in sorted(self._tops.get(name, []), reverse=True)],
                }
                for name in self.vectors
            },
        }


class Screener:
    """Scores samples against vectors through the engine.

    Example::

        screener = Screener(EngineRunner(engine), lm.tokenizer, [registry.get("evil")])
        async for row in screener.rows(lines):   # lines: iterable of (line_no, text)
            ...
    """

    def __init__(self, runner: EngineRunner, tokenizer, vectors: list[PersonaVector], *,
                 layers: dict[str, int] | None = None, generate: bool = True, max_new_tokens: int = 64,
                 chunk: int = 32, limit: PromptLimit | None = None):
        self.runner, self.tok, self.vectors = runner, tokenizer, vectors
        self.limit = limit or PromptLimit(runner.engine.max_model_len)
        self.layers = {v.name: (layers or {}).get(v.name) or v.recommended_layer for v in vectors}
        self.units = {v.name: v.direction(self.layers[v.name]) / v.direction(self.layers[v.name]).norm() for v in vectors}
        self.generate, self.max_new_tokens, self.chunk = generate, max_new_tokens, chunk

    def _proj(self, name: str, states: torch.Tensor) -> float:
        return float(states[self.layers[name]] @ self.units[name])

    async def _natural(self, prompt: list[int]) -> tuple[str, dict[int, torch.Tensor]]:
        """Greedy natural answer, plus the last prompt token's states from the same prefill."""
        req = GenerationRequest(prompt_ids=prompt, capture_layers=frozenset(self.layers.values()),
                                adapter=self.runner.adapter,
                                sampling=SamplingParams(max_new_tokens=self.max_new_tokens if self.generate else 0, temperature=0))
        states: dict[int, torch.Tensor] = {}
        async for event in generate_text(self.runner.engine, req, self.tok):
            if isinstance(event, PrefillDone):
                states = event.states
            elif isinstance(event, Finished):
                return event.text, states
        raise RuntimeError("generation returned no result")

    def encode(self, sample: Sample) -> Sample:
        """Tokenize ``sample``; :class:`SampleError` when a sequence the engine would read does
        not fit: prompt + training response, and (when generating) prompt + natural answer."""
        sample.prompt_ids = chat_prompt_ids(self.tok, sample.messages)
        sample.response_ids = text_ids(self.tok, sample.response)
        n_prompt = len(sample.prompt_ids)
        try:
            self.limit.check(n_prompt + len(sample.response_ids),
                             what=f"the prompt ({n_prompt} tokens) with its training response ({len(sample.response_ids)})")
            if self.generate:
                self.limit.check(n_prompt + self.max_new_tokens,
                                 what=f"the prompt ({n_prompt} tokens) with a natural answer of up to {self.max_new_tokens}")
        except PromptTooLongError as exc:
            raise SampleError(str(exc)) from None
        return sample

    async def _score(self, samples: list[Sample]) -> list[dict]:
        prompts = [s.prompt_ids for s in samples]
        naturals = await asyncio.gather(*(self._natural(p) for p in prompts))
        train = await self.runner.span_means([s.prompt_ids + s.response_ids for s in samples], [len(p) for p in prompts])
        if self.generate:
            natural = await self.runner.span_means([p + text_ids(self.tok, text or " ") for p, (text, _) in zip(prompts, naturals)],
                                                   [len(p) for p in prompts])
        rows = []
        for i, s in enumerate(samples):
            scores = {}
            for v in self.vectors:
                t = self._proj(v.name, train[i])
                last = float(naturals[i][1][self.layers[v.name]].float() @ self.units[v.name])
                nat = self._proj(v.name, natural[i]) if self.generate else None
                scores[v.name] = {
                    "layer": self.layers[v.name],
                    "train": round(t, 4),
                    "natural": None if nat is None else round(nat, 4),
                    "diff": None if nat is None else round(t - nat, 4),
                    "prompt_last_token": round(last, 4),
                    "cheap_diff": round(t - last, 4),
                }
            rows.append({"line": s.line, "scores": scores})
        return rows

    async def rows(self, lines: Iterable[tuple[int, str | SampleError]] | AsyncIterator[tuple[int, str | SampleError]],
                   report: ScreenReport):
        """Yield one scored row per valid sample; malformed lines go to ``report`` (:meth:`ScreenReport.error`)."""
        batch: list[Sample] = []
        since = time.monotonic()

        async def each():
            if hasattr(lines, "__aiter__"):
                async for item in lines:
                    yield item
            else:
                for item in lines:
                    yield item

        async for line_no, raw in each():
            if time.monotonic() - since > YIELD_AFTER_S:
                # Malformed and blank lines never reach the engine, so nothing else here awaits.
                await asyncio.sleep(0)
                since = time.monotonic()
            try:
                if isinstance(raw, SampleError):
                    raise raw
                sample = parse_line(line_no, raw)
                if sample is None:
                    continue
                batch.append(self.encode(sample))
            except SampleError as exc:
                report.error(line_no, str(exc))
                continue
            if len(batch) >= self.chunk:
                for row in await self._score(batch):
                    report.add(row)
                    yield row
                batch = []
        if batch:
            for row in await self._score(batch):
                report.add(row)
                yield row
