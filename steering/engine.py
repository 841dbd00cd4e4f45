"""The generation engine: one worker thread owns the model and runs a step loop.

Flow: ``Engine.generate`` puts a request on a bounded queue and returns an async stream
of events. At each step the worker either prefills the requests that arrived (as one
left-padded batch) and merges them into the running batch, or runs one decode step for
every running row. Rows leave the batch as soon as they finish or their client goes away.
Each row carries its own steering: the hooks add ``delta[row]`` from tensors rebuilt only
when the batch changes. The prefill forward also records the last prompt token's hidden
state at the layers a request asks for (for the monitor), so that costs no extra pass.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import DynamicCache

from steering.detokenize import TextStream
from steering.hooks import SteeringHooks
from steering.model import LoadedModel
from steering.sampling import SamplingParams, make_generator, pick_tokens
from steering.steer import RowSteering, stack_deltas

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """The engine could not finish a request (a failed forward pass, shutdown)."""


class QueueFullError(EngineError):
    """Too many requests are waiting; the caller should retry after ``retry_after`` seconds."""

    def __init__(self, waiting: int, retry_after: int = 1):
        super().__init__(f"the server is at capacity ({waiting} requests waiting); retry later")
        self.retry_after = retry_after


class DrainingError(EngineError):
    """The engine is draining for shutdown and takes no new requests."""

    retry_after = 5


class DeadlineExceededError(EngineError):
    """The request ran past its deadline."""


@dataclass
class GenerationRequest:
    """What the engine needs to generate for one request (already validated and tokenized)."""

    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    steering: RowSteering | None = None
    capture_layers: frozenset[int] = frozenset()
    timeout_s: float | None = None
    request_id: str = ""
    # Called in the worker with the prefill states; a non-None result blocks the request
    # before any token is sampled and is reported in PrefillDone.blocked.
    prefill_check: Callable[[dict[int, torch.Tensor]], object | None] | None = None
    # Called in the worker with each generated token's states at these layers; True stops
    # the request with finish_reason "content_filter".
    response_layers: frozenset[int] = frozenset()
    response_check: Callable[[dict[int, torch.Tensor]], bool] | None = None
    # Prompt position from which to average the state at every layer (teacher-forced
    # extraction): PrefillDone.span_mean is then [num_layers + 1, hidden].
    mean_from: int | None = None
    # Token ids whose next-token log-probabilities after the prompt PrefillDone reports
    # (answer options of an inventory item).
    option_ids: tuple[int, ...] = ()


@dataclass
class PrefillDone:
    """The prompt has been read. ``prompt_states[layer]`` is the last prompt token's state."""

    prompt_states: dict[int, torch.Tensor]
    queue_wait_s: float
    blocked: object | None = None
    span_mean: torch.Tensor | None = None
    option_logprobs: list[float] | None = None


@dataclass
class TokenDelta:
    text: str
    token_ids: list[int]


@dataclass
class Finished:
    finish_reason: str  # "stop" | "length" | "content_filter"
    text: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class _Handle:
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancelled: bool = False

    def emit(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the client's event loop is gone
            self.cancelled = True


@dataclass
class _Row:
    request: GenerationRequest
    handle: _Handle
    text: TextStream
    generator: torch.Generator | None
    submitted: float
    deadline: float | None
    next_token: int = -1
    done: bool = False


class Engine:
    """Continuous-batching generation over one :class:`LoadedModel`.

    Example::

        engine = Engine(lm, max_batch_size=32, max_waiting=128)
        engine.start()
        async for event in engine.generate(GenerationRequest(prompt_ids=ids)):
            ...   # PrefillDone, then TokenDelta*, then Finished
        engine.shutdown()

    The engine mutates nothing outside itself but the hook state on ``lm``'s blocks.
    """

    def __init__(self, lm: LoadedModel, *, max_batch_size: int = 32, max_waiting: int = 256):
        self.lm = lm
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        self.hooks = SteeringHooks(lm.blocks, lm.model.get_input_embeddings())
        self.forward_passes = 0
        self._pending: collections.deque[_Row] = collections.deque()
        self._wake = threading.Condition()
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None
        self._decode_deltas: dict[int, torch.Tensor] = {}
        self._stopping = False
        self._draining = False
        self._thread: threading.Thread | None = None
        self._device = lm.input_device

    # ---- public surface ------------------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="persona-engine", daemon=True)
        self._thread.start()

    def drain(self) -> None:
        """Refuse new requests; running and queued ones go on to completion."""
        self._draining = True

    @property
    def draining(self) -> bool:
        return self._draining

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self.hooks.remove()

    async def generate(self, request: GenerationRequest):
        """Queue ``request`` and yield its events; closing the stream cancels the request.

        Raises :class:`QueueFullError` at once when the queue is full.
        """
        handle = _Handle(loop=asyncio.get_running_loop(), events=asyncio.Queue())
        now = time.monotonic()
        row = _Row(
            request=request,
            handle=handle,
            text=TextStream(self.lm.tokenizer, request.sampling.stop),
            generator=make_generator(request.sampling.seed, self._device),
            submitted=now,
            deadline=now + request.timeout_s if request.timeout_s else None,
        )
        with self._wake:
            if self._stopping or self._draining:
                raise DrainingError("the server is shutting down; retry on another replica")
            if len(self._pending) >= self.max_waiting:
                raise QueueFullError(len(self._pending))
            self._pending.append(row)
            self._wake.notify()
        try:
            while True:
                event = await handle.events.get()
                if isinstance(event, Exception):
                    raise event
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            handle.cancelled = True

    # ---- worker --------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._stopping and not self._pending and not self._rows:
                        self._wake.wait()
                    if self._stopping:
                        break
                    new = self._take_new()
                # A failed forward fails the rows that were in it, not the server: a failed
                # prefill leaves the running batch untouched; a failed decode step may have
                # half-updated the cache, so its rows end and the batch starts afresh.
                affected = new or self._rows
                try:
                    if new:
                        self._prefill(new)
                    elif self._rows:
                        self._decode()
                except Exception as exc:
                    log.exception("forward pass failed")
                    for row in affected:
                        row.done = True
                        row.handle.emit(EngineError(f"generation failed: {type(exc).__name__}: {exc}"))
                    if not new:
                        self._reset_batch()
                self._drop_finished()
        self._fail_all(EngineError("the engine shut down"))

    def _take_new(self) -> list[_Row]:
        room = self.max_batch_size - len(self._rows)
        new = []
        while self._pending and len(new) < room:
            row = self._pending.popleft()
            if not row.handle.cancelled:
                new.append(row)
        return new

    def _prefill(self, new: list[_Row]) -> None:
        width = max(len(r.request.prompt_ids) for r in new)
        pad = self.lm.tokenizer.pad_token_id or 0
        ids = torch.full((len(new), width), pad, dtype=torch.long)
        mask = torch.zeros((len(new), width), dtype=torch.long)
        for i, row in enumerate(new):
            prompt = row.request.prompt_ids
            ids[i, width - len(prompt) :] = torch.tensor(prompt)
            mask[i, width - len(prompt) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        deltas = self._stack([r.request.steering for r in new], "prompt")
        capture = frozenset().union(*(r.request.capture_layers for r in new))
        spans = [(i, width - len(r.request.prompt_ids) + r.request.mean_from, width)
                 for i, r in enumerate(new) if r.request.mean_from is not None]
        span_row = {row: k for k, (row, _a, _b) in enumerate(spans)}
        cache = DynamicCache()
        with self.hooks.state(deltas, capture, spans) as captured:
            out = self._forward(ids, mask, positions, cache)
        means = self.hooks.span_means
        logits = out.logits[:, -1, :].float()
        started = time.monotonic()
        for i, row in enumerate(new):
            states = {layer: captured[layer][i] for layer in row.request.capture_layers}
            check = row.request.prefill_check
            blocked = check(states) if check is not None else None
            span_mean = None
            if i in span_row:
                span_mean = torch.stack([means[layer][span_row[i]].cpu() for layer in range(self.lm.num_layers + 1)])
            options = None
            if row.request.option_ids:
                options = torch.log_softmax(logits[i], dim=-1)[list(row.request.option_ids)].tolist()
            row.handle.emit(PrefillDone(prompt_states=states, queue_wait_s=started - row.submitted,
                                        blocked=blocked, span_mean=span_mean, option_logprobs=options))
            if blocked is not None:
                row.done = True
            elif row.request.sampling.max_new_tokens == 0:  # prefill only (monitor calibration)
                row.done = True
                row.handle.emit(Finished("length", "", len(row.request.prompt_ids), 0))
        self._advance(new, logits)
        self._merge(new, out.past_key_values, mask)

    def _decode(self) -> None:
        ids = torch.tensor([[r.next_token] for r in self._rows], dtype=torch.long)
        positions = self._mask.sum(-1, keepdim=True)
        self._mask = torch.cat([self._mask, torch.ones((len(self._rows), 1), dtype=torch.long)], dim=-1)
        watch = frozenset().union(*(r.request.response_layers for r in self._rows))
        with self.hooks.state(self._decode_deltas, watch) as captured:
            out = self._forward(ids, self._mask, positions, self._cache)
        self._cache = out.past_key_values
        if watch:
            self._watch_responses(captured)
        self._advance(self._rows, out.logits[:, -1, :].float())

    def _watch_responses(self, captured: dict[int, torch.Tensor]) -> None:
        for i, row in enumerate(self._rows):
            check = row.request.response_check
            if check is None or row.done:
                continue
            if check({layer: captured[layer][i] for layer in row.request.response_layers}):
                row.done = True
                tail = row.text.flush()
                if tail:
                    row.handle.emit(TokenDelta(text=tail, token_ids=[]))
                row.handle.emit(Finished("content_filter", row.text.text, len(row.request.prompt_ids),
                                         len(row.text.token_ids)))

    def _forward(self, ids, mask, positions, cache):
        self.forward_passes += 1
        dev = self._device
        return self.lm.model(
            input_ids=ids.to(dev),
            attention_mask=mask.to(dev),
            position_ids=positions.to(dev),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )

    def _advance(self, rows: list[_Row], logits: torch.Tensor) -> None:
        eos = self.lm.eos_token_ids
        now = time.monotonic()
        tokens = pick_tokens(
            logits.cpu(),
            [r.request.sampling for r in rows],
            [r.generator for r in rows],
            block_eos=[r.request.sampling.ignore_eos or len(r.text.token_ids) < r.request.sampling.min_tokens for r in rows],
            eos_ids=sorted(eos),
        )
        for i, row in enumerate(rows):
            if row.done:
                continue
            if row.handle.cancelled:
                row.done = True
                continue
            params = row.request.sampling
            token = tokens[i]
            row.next_token = token
            finish = None
            if token in eos and not params.ignore_eos:
                row.text.token_ids.append(token)
                delta, finish = row.text.flush(), "stop"
            else:
                delta = row.text.push(token)
                if row.text.stopped:
                    finish = "stop"
                elif len(row.text.token_ids) >= params.max_new_tokens:
                    delta, finish = delta + row.text.flush(), "length"
            if delta:
                row.handle.emit(TokenDelta(text=delta, token_ids=[token]))
            if finish is None and row.deadline is not None and now > row.deadline:
                row.done = True
                row.handle.emit(
                    DeadlineExceededError(f"request exceeded its deadline of {row.request.timeout_s:g} s")
                )
                continue
            if finish is not None:
                row.done = True
                row.handle.emit(
                    Finished(
                        finish_reason=finish,
                        text=row.text.text,
                        prompt_tokens=len(row.request.prompt_ids),
                        completion_tokens=len(row.text.token_ids),
                    )
                )

    # ---- batch bookkeeping ---------------------------------------------------------------

    def _stack(self, steering: list[RowSteering | None], phase: str) -> dict[int, torch.Tensor]:
        return stack_deltas(
            steering,
            phase,
            hidden_size=self.lm.hidden_size,
            dtype=self.lm.dtype,
            device_of_layer=self.lm.block_device,
        )

    def _merge(self, new: list[_Row], cache: DynamicCache, mask: torch.Tensor) -> None:
        keep = [i for i, r in enumerate(new) if not r.done]
        if not keep:
            return
        if len(keep) < len(new):
            cache, mask = _select(cache, mask, keep)
        rows = [new[i] for i in keep]
        if not self._rows:
            self._cache, self._mask, self._rows = cache, mask, rows
        else:
            self._cache, self._mask = _concat(self._cache, self._mask, cache, mask)
            self._rows = self._rows + rows
        self._decode_deltas = self._stack([r.request.steering for r in self._rows], "response")

    def _drop_finished(self) -> None:
        keep = [i for i, r in enumerate(self._rows) if not (r.done or r.handle.cancelled)]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._reset_batch()
            return
        self._cache, self._mask = _select(self._cache, self._mask, keep)
        self._rows = [self._rows[i] for i in keep]
        self._decode_deltas = self._stack([r.request.steering for r in self._rows], "response")

    def _reset_batch(self) -> None:
        self._rows, self._cache, self._mask, self._decode_deltas = [], None, None, {}

    def _fail_all(self, exc: Exception) -> None:
        for row in list(self._pending) + self._rows:
            row.handle.emit(exc)
        self._pending.clear()
        self._reset_batch()


def _layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _select(cache: DynamicCache, mask: torch.Tensor, keep: list[int]):
    """Keep rows ``keep`` and drop leading columns that are padding in every kept row."""
    mask = mask[keep]
    first = int((mask.sum(0) > 0).nonzero()[0]) if mask.numel() else 0
    index = torch.tensor(keep, device=cache.layers[0].keys.device)
    kv = [
        (k.index_select(0, index.to(k.device))[:, :, first:], v.index_select(0, index.to(v.device))[:, :, first:])
        for k, v in _layers(cache)
    ]
    return DynamicCache(ddp_cache_data=kv), mask[:, first:]


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    extra = width - t.shape[-2]
    if extra == 0:
        return t
    pad = t.new_zeros(t.shape[:-2] + (extra, t.shape[-1]))
    return torch.cat([pad, t], dim=-2)


def _concat(cache_a, mask_a, cache_b, mask_b):
    """Stack two batches' caches, left-padding the shorter one with masked zeros."""
    width = max(mask_a.shape[1], mask_b.shape[1])
    kv = [
        (
            torch.cat([_left_pad(ka, width), _left_pad(kb, width)], dim=0),
            torch.cat([_left_pad(va, width), _left_pad(vb, width)], dim=0),
        )
        for (ka, va), (kb, vb) in zip(_layers(cache_a), _layers(cache_b))
    ]
    def pad_mask(m):
        return torch.cat([m.new_zeros((m.shape[0], width - m.shape[1])), m], dim=1)
    return DynamicCache(ddp_cache_data=kv), torch.cat([pad_mask(mask_a), pad_mask(mask_b)], dim=0)
