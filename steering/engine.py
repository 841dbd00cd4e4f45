"""The generation engine: one worker thread owns the model and runs a step loop over token ids.

Flow: :meth:`Engine.generate` puts a request on a bounded queue and returns an async stream
of events. Each step has a token budget: one token for every decoding row, then chunks of
the prompts being prefilled (first come, first served) until the budget is spent. All of
them run as one packed forward over a preallocated slot cache (:mod:`steering.kvcache`), so
an arriving prompt delays running rows by at most one step, and rows join and leave without
moving anyone's cache. Every token carries an index into per-layer tables of steering
deltas (:class:`steering.steer.DeltaTable`), so rows steer independently and rows that do
not steer cost nothing. Sampling runs on the model's device with per-row parameters.

A step has four parts, in this order: scheduling (:class:`Scheduler`: which rows run),
the step's layout (:func:`lay_out` builds a :class:`PackedStep`: positions, slots, indexes,
what to capture, which logits come back), the forward (``Engine._run_model``) and the per-row
outcome (``Engine._outcome``: scores, prefill reports, sampling, stop checks, row by row).

The engine moves token ids only: text, stop strings and monitor verdicts belong to the
consumer (:mod:`steering.output`). It reports the last prompt token's state at the layers a
request asks for, raw or already projected onto the request's probe directions on the
model's device, during the prefill the request needs anyway. Events of a step reach the
event loop in one hand-off.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import math
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from steering import fastpath, kvcache
from steering.adapters import Adapter, LoraHooks, LoraStep
from steering.hooks import SteeringHooks, StepHooks
from steering.layers import AttentionShape, text_config
from steering.model import LoadedModel
from steering.sampling import RowState, SamplingParams, make_generator, option_logprobs, sample
from steering.steer import ConditionalSteering, DeltaTable, RowSteering, add_deltas

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


class EngineDeadError(EngineError):
    """The worker thread stopped; no request can be served until the process restarts."""


class RequestTooLongError(EngineError):
    """The prompt plus the tokens asked for do not fit the engine's ``max_model_len``."""


class UnsupportedOnEngineError(EngineError):
    """The request needs something this engine does not do; ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class GenerationRequest:
    """What the engine needs for one request (validated, tokenized)."""

    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    steering: RowSteering | None = None
    # Layers whose last-prompt-token state PrefillDone.states reports (float32, on the CPU).
    capture_layers: frozenset[int] = frozenset()
    # layer -> unit directions [M, hidden]: PrefillDone.projections[layer] holds the last prompt
    # token's M scalar projections, computed on the model's device.
    probes: dict[int, torch.Tensor] = field(default_factory=dict)
    # layer -> [M] limits on those projections: one above its limit ends the request right
    # after its prefill, before any token is sampled (an enforced block).
    block_above: dict[int, torch.Tensor] = field(default_factory=dict)
    # Monitors' remediations: each switches its response-phase deltas on for the generated tokens
    # when its probe reads above its limit at the prefill (and no block ended the request).
    remediations: tuple[ConditionalSteering, ...] = ()
    # The same for every generated token (TokenOut.projections), for response-phase monitors.
    response_probes: dict[int, torch.Tensor] = field(default_factory=dict)
    timeout_s: float | None = None
    request_id: str = ""
    # Prompt position from which to average the state at every layer (teacher-forced
    # extraction): PrefillDone.span_mean is then [num_layers + 1, hidden].
    mean_from: int | None = None
    # Token ids whose next-token log-probabilities after the prompt PrefillDone reports.
    option_ids: tuple[int, ...] = ()
    # Prompt position from which PrefillDone.prompt_logprobs holds each prompt token's
    # log-probability given the tokens before it (teacher-forced scoring, vLLM's prompt_logprobs).
    score_from: int | None = None
    # Requests of one group carry the same prompt, steering and adapter (the n choices of one API
    # request): one of them reads the prompt and the others get a copy of its cache, then read
    # only their last token (for their own logits, captures and probes). Not for mean_from/score_from.
    prefill_group: str | None = None
    # The LoRA adapter this request's tokens run with (None: the base model). The request holds
    # the adapter itself, so unloading it from the store never disturbs a request in flight.
    adapter: Adapter | None = None

    def __repr__(self) -> str:
        # Short on purpose: the generated repr prints every steering and probe tensor in full,
        # which takes milliseconds under the GIL that the worker's step needs too.
        parts = [f"request_id={self.request_id!r}", f"prompt_tokens={len(self.prompt_ids)}",
                 f"max_new_tokens={self.sampling.max_new_tokens}"]
        if self.steering is not None:
            parts.append(f"steering={sorted(self.steering.prompt.keys() | self.steering.response.keys())}")
        if self.adapter is not None:
            parts.append(f"adapter={self.adapter.name!r}")
        for name in ("probes", "response_probes", "capture_layers"):
            if getattr(self, name):
                parts.append(f"{name}={sorted(getattr(self, name))}")
        return f"GenerationRequest({', '.join(parts)})"


@dataclass
class PrefillDone:
    """The prompt has been read (its last chunk ran in this step)."""

    states: dict[int, torch.Tensor]
    projections: dict[int, list[float]]
    queue_wait_s: float
    span_mean: torch.Tensor | None = None
    option_logprobs: list[float] | None = None
    prompt_logprobs: list[float] | None = None
    blocked: bool = False
    remediated: tuple[str, ...] = ()  # the names of the remediations switched on for this row


@dataclass
class TokenOut:
    """One generated token id, with its log-probabilities and probe projections when asked."""

    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    projections: dict[int, list[float]] | None = None


@dataclass
class Done:
    """The engine ended the request: ``stop`` (EOS or a stop token id), ``length``, or ``blocked``
    (a probe crossed its ``block_above`` limit at the prefill)."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class GenerationEngine(Protocol):
    """What app/ needs from an engine; :class:`Engine` (ours) and
    :class:`steering.vllm_engine.VLLMEngine` implement it.

    ``generate`` submits one request (with what to capture: ``probes``, ``block_above``,
    ``response_probes``, ``capture_layers``) and yields ``PrefillDone``, ``TokenOut``...,
    ``Done``; closing the stream cancels the request. ``check`` raises before submission when
    a request cannot run on this engine.
    """

    lm: LoadedModel
    name: str
    unsupported: frozenset[str]
    max_batch_size: int
    max_waiting: int
    max_model_len: int

    def generate(self, request: GenerationRequest) -> AsyncIterator[PrefillDone | TokenOut | Done]: ...
    def check(self, request: GenerationRequest) -> None: ...
    async def astart(self) -> None: ...
    def drain(self) -> None: ...
    def shutdown(self, timeout: float = 10.0) -> None: ...
    @property
    def running(self) -> int: ...
    @property
    def waiting(self) -> int: ...
    @property
    def alive(self) -> bool: ...
    @property
    def draining(self) -> bool: ...


@dataclass
class _Handle:
    loop: asyncio.AbstractEventLoop | None  # None: events are appended to ``events`` (a list) directly
    events: asyncio.Queue | list
    cancelled: bool = False


@dataclass(eq=False, repr=False)
class _Row:
    request: GenerationRequest
    handle: _Handle
    uid: int
    generator: torch.Generator | None
    submitted: float
    deadline: float | None
    slot: int = -1
    computed: int = 0  # prompt tokens already in the cache
    output: list[int] = field(default_factory=list)
    steer_ids: dict[tuple[int, str], int] = field(default_factory=dict)
    span_sums: dict[int, torch.Tensor] = field(default_factory=dict)
    scored: list[float] = field(default_factory=list)
    queue_wait_s: float = 0.0
    done: bool = False

    def __repr__(self) -> str:
        return f"_Row(uid={self.uid}, slot={self.slot}, computed={self.computed}, output={len(self.output)})"

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def decoding(self) -> bool:
        return self.computed == self.prompt_len

    @property
    def length(self) -> int:
        return self.computed + len(self.output)


@dataclass
class _Step:
    """The rows the scheduler picked for one step: every decoding row, then prompt chunks."""

    decode: list[_Row]
    chunks: list[tuple[_Row, int, int]]  # (row, first prompt position, end position)

    @property
    def rows(self) -> list[_Row]:
        return self.decode + [row for row, _a, _b in self.chunks]


class Scheduler:
    """Scheduling: which rows run in a step.

    Owns the waiting queue (``pending``), the running rows (``rows``), the free cache slots
    (``free_slots``) and the step's token budget. Every request passes through ``pending`` and is
    admitted first come, first served while a slot is free; it keeps that slot to its end. There is
    no preemption: a slot holds ``max_model_len`` tokens, so a running row never runs out of cache.
    A step takes one token from every decoding row, then prompt chunks in arrival order until the
    budget is spent in tokens or in work (:meth:`chunk_cost`).

    It touches neither the model nor the cache and emits no events: the rows it finds past their
    deadline it hands back to the engine to fail. The engine holds its lock around :meth:`queue`,
    :meth:`leave`, :meth:`expire_queued` and :meth:`admit`, which race with the request side.

    Example::

        scheduler = Scheduler(max_batch_size=4, max_waiting=8, max_num_batched_tokens=64,
                              attention_horizon=1536.0)
        scheduler.queue(row)
        scheduler.admit(lambda row: True)
        step = scheduler.plan()   # row's first prompt chunk, at most 64 tokens
    """

    def __init__(self, *, max_batch_size: int, max_waiting: int, max_num_batched_tokens: int,
                 attention_horizon: float):
        self.max_waiting = max_waiting
        self.max_num_batched_tokens = max_num_batched_tokens
        self.attention_horizon = attention_horizon
        self.pending: collections.deque[_Row] = collections.deque()
        self.rows: list[_Row] = []
        self.free_slots = list(range(max_batch_size - 1, -1, -1))

    def queue(self, row: _Row) -> None:
        """Append ``row`` to the queue; :class:`QueueFullError` when no place is left."""
        # Only the rows beyond the free slots wait: as in the vLLM engine, refused once running +
        # waiting reach max_batch_size + max_waiting (so max_waiting=0 means no queue, not no service).
        if len(self.pending) >= self.max_waiting + len(self.free_slots):
            raise QueueFullError(max(0, len(self.pending) - len(self.free_slots)))
        self.pending.append(row)

    def leave(self, row: _Row) -> None:
        """Take ``row`` out of the queue if it is still there (its client left)."""
        # Not deque.remove + ValueError: for a row already admitted, the usual case, that formats
        # the row into the error message on every request's exit.
        if row in self.pending:
            self.pending.remove(row)

    def expire_queued(self, now: float) -> list[_Row]:
        """Drop cancelled rows from the queue; remove and return the rows past their deadline."""
        expired = []
        for row in list(self.pending):
            if row.handle.cancelled:
                self.pending.remove(row)
            elif row.deadline is not None and now > row.deadline:
                self.pending.remove(row)
                expired.append(row)
        return expired

    def admit(self, join) -> None:
        """Move queued rows into free slots, first come first served. ``join(row)`` runs first and
        returns False for a row that cannot start (it has failed that row), which takes no slot."""
        while self.pending and self.free_slots:
            row = self.pending.popleft()
            row.queue_wait_s = time.monotonic() - row.submitted
            if not join(row):
                continue
            row.slot = self.free_slots.pop()
            self.rows.append(row)

    def overdue(self, now: float) -> list[_Row]:
        """Mark cancelled running rows done; return the running rows past their deadline."""
        late = []
        for row in self.rows:
            if row.handle.cancelled:
                row.done = True
            elif row.deadline is not None and now > row.deadline and not row.done:
                late.append(row)
        return late

    def plan(self) -> _Step:
        """The rows of the next step: every decoding row, then prompt chunks within the budget."""
        decode = [r for r in self.rows if not r.done and r.decoding]
        budget = self.max_num_batched_tokens - len(decode)
        # The same budget in work: a prompt token costs 1 plus its attention to the tokens before
        # it, so a chunk deep into a long prompt gets fewer tokens than a fresh one.
        work = self.chunk_cost(0, self.max_num_batched_tokens) - len(decode)
        chunks = []
        reading: set[str] = set()  # prefill groups one of whose rows reads the shared prompt
        for row in self.rows:
            if budget <= 0:
                break
            if row.done or row.decoding:
                continue
            group = row.request.prefill_group
            if group is not None:
                if row.computed == 0 and row.prompt_len > 1 and group in reading:
                    continue  # it gets the reader's cache (Engine._share_prefill)
                reading.add(group)
            n = min(row.prompt_len - row.computed, budget, self.affordable(row.computed, work))
            if n <= 0:
                if chunks:
                    break
                n = 1  # the first chunk of a step always advances
            chunks.append((row, row.computed, row.computed + n))
            budget -= n
            work -= self.chunk_cost(row.computed, n)
        return _Step(decode, chunks)

    def chunk_cost(self, past: int, n: int) -> float:
        """Work of ``n`` prompt tokens after ``past`` cached ones, in fresh-token units: each
        token costs 1 plus (tokens it attends to) / ``attention_horizon``."""
        return n + n * (past + (n - 1) / 2) / self.attention_horizon

    def affordable(self, past: int, work: float) -> int:
        """The most tokens after ``past`` cached ones whose :meth:`chunk_cost` fits in ``work``."""
        if work <= 0:
            return 0
        h = self.attention_horizon
        b = 1 + (past - 0.5) / h
        n = int((math.sqrt(b * b + 2 * work / h) - b) * h)
        while n > 0 and self.chunk_cost(past, n) > work:  # floating-point edge
            n -= 1
        return n

    def release(self, free) -> None:
        """Take finished and cancelled rows out of the running set, call ``free(row)`` for each and
        take back its slot."""
        keep = []
        for row in self.rows:
            if row.done or row.handle.cancelled:
                row.done = True
                free(row)
                self.free_slots.append(row.slot)
            else:
                keep.append(row)
        if len(keep) != len(self.rows):
            self.rows = keep
            # Lowest slots first keeps the running rows packed at the front of the cache.
            self.free_slots.sort(reverse=True)

    def take_all(self) -> list[_Row]:
        """Empty the queue and the running set; return their rows (queued first)."""
        rows = list(self.pending) + self.rows
        self.pending.clear()
        self.rows = []
        return rows


@dataclass
class PackedStep:
    """The step's layout: its tokens packed into one sequence, and where everything sits in it.

    Built by :func:`lay_out` from a scheduled :class:`_Step`. The forward reads ``ids``,
    ``positions``, ``attention``, ``hooks`` and ``lora``, and returns one logits row per entry of
    ``keep``, in its order: first one for each row of ``logit_rows`` (the rows that sample or
    report option log-probabilities), then the scored prompt positions, each row's run starting
    at the index its ``scoring`` entry names. The per-row outcome reads the rest.
    """

    ids: list[int]
    positions: list[int]  # of each token in its row
    attention: kvcache.StepLayout
    hooks: StepHooks  # steering indexes, captures and spans in; captured states and span sums out
    lora: LoraStep | None
    keep: list[int]  # packed positions whose logits the forward returns
    last: dict[_Row, int]  # packed position of the newest token of each decoding or fully read row
    logit_rows: list[_Row]
    captured_at: dict[int, dict[int, int]]  # layer -> packed position -> index in hooks.captured[layer]
    scoring: list[tuple[_Row, int, list[int]]]  # (row, index of its first scored logit, target ids)

    def state(self, layer: int, row: _Row) -> torch.Tensor:
        """``row``'s captured state at ``layer`` for its newest token in this step."""
        return self.hooks.captured[layer][self.captured_at[layer][self.last[row]]]


def lay_out(step: _Step, cache: kvcache.SlotKVCache, deltas: DeltaTable, device: torch.device,
            kernels=None) -> PackedStep:
    """Pack ``step``'s tokens into one sequence and record where everything is (the step's layout).

    Decoding rows come first, one token each (their newest), then each prompt chunk. Per token:
    its id, its position in its row and its cache slot; per steered layer an index into that
    layer's delta table (a row's response deltas for generated tokens, its prompt deltas for
    prompt tokens); the adapter of each token. Per step: the attention's layout, the states to
    capture (the last prompt token of a fully read row, every decoding row with response probes),
    the spans to average, and the logits to keep (see :class:`PackedStep`). With ``kernels``
    (steering.cpu_kernels, where every layer runs on the CPU) the attention reads only slots and
    positions, so the decoding rows' masks are not built. Reads ``cache`` and ``deltas`` only.

    Example::

        packed = lay_out(scheduler.plan(), engine.cache, engine.deltas, torch.device("cpu"))
        packed.ids[:len(step.decode)]   # the decoding rows' newest tokens
    """
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    hooks = StepHooks()
    for row in step.decode:
        ids.append(row.output[-1])
        positions.append(row.length - 1)
        slots.append(row.slot)
    chunks = []
    for row, a, b in step.chunks:
        start = len(ids)
        ids.extend(row.request.prompt_ids[a:b])
        positions.extend(range(a, b))
        slots.extend([row.slot] * (b - a))
        chunks.append(kvcache.Chunk(start=start, end=len(ids), slot=row.slot, past=a))
        mean_from = row.request.mean_from
        if mean_from is not None and b > mean_from:
            hooks.spans.append((row.uid, start + max(0, mean_from - a), len(ids)))
    nd = len(step.decode)
    attention = kvcache.StepLayout(
        cache=cache,
        slots=torch.tensor(slots, device=device),
        positions=torch.tensor(positions, device=device),
        num_decode=nd,
        chunks=chunks,
        kernels=kernels,
    )
    if nd and kernels is None:
        decode_slots = [r.slot for r in step.decode]
        span = max(decode_slots) + 1
        lengths = [1] * span
        for row in step.decode:
            lengths[row.slot] = row.length
        width = max(lengths)
        attention.decode_span = span
        attention.decode_dense = decode_slots == list(range(nd))
        attention.decode_slots = torch.tensor(decode_slots, device=device)
        attention.decode_mask = (torch.arange(width, device=device)[None, :]
                                 < torch.tensor(lengths, device=device)[:, None])[:, None, None, :]
    # Token positions (in the packed step) of the rows whose next token is sampled here,
    # and of the tokens whose states are captured.
    last: dict[_Row, int] = {}
    logit_rows: list[_Row] = []
    capture: dict[int, list[int]] = {}
    for i, row in enumerate(step.decode):
        last[row] = i
        logit_rows.append(row)
        for layer in row.request.response_probes:
            capture.setdefault(layer, []).append(i)
    for chunk, (row, _a, b) in zip(chunks, step.chunks):
        if b != row.prompt_len:
            continue
        last[row] = chunk.end - 1
        if row.request.sampling.max_new_tokens > 0 or row.request.option_ids:
            logit_rows.append(row)
        # The last prompt token's state also produces the first token (response probes).
        for layer in row.request.capture_layers | row.request.probes.keys() | row.request.response_probes.keys():
            capture.setdefault(layer, []).append(last[row])
    hooks.capture = {layer: torch.tensor(where, device=device) for layer, where in capture.items()}
    _steering_index(step, deltas, hooks, len(ids))
    keep = [last[row] for row in logit_rows]
    scoring = []
    for chunk, (row, a, b) in zip(chunks, step.chunks):
        score_from = row.request.score_from
        if score_from is None:
            continue
        # The logit at position q predicts the token at q + 1: this chunk scores the prompt
        # tokens after its positions from score_from - 1 on (never past the prompt's end).
        first, end = max(a, score_from - 1), min(b, row.prompt_len - 1)
        if first < end:
            scoring.append((row, len(keep), row.request.prompt_ids[first + 1 : end + 1]))
            keep.extend(range(chunk.start + first - a, chunk.start + end - a))
    return PackedStep(
        ids=ids, positions=positions, attention=attention, hooks=hooks, lora=_lora_layout(step, chunks, device),
        keep=keep or [len(ids) - 1], last=last, logit_rows=logit_rows,
        captured_at={layer: {token: k for k, token in enumerate(where)} for layer, where in capture.items()},
        scoring=scoring)


def _lora_layout(step: _Step, chunks: list[kvcache.Chunk], device: torch.device) -> LoraStep | None:
    """The packed positions of each adapter's tokens in this step (None when no row has one)."""
    rows = [(row.request.adapter, [i]) for i, row in enumerate(step.decode) if row.request.adapter is not None]
    rows += [(row.request.adapter, list(range(chunk.start, chunk.end)))
             for chunk, (row, _a, _b) in zip(chunks, step.chunks) if row.request.adapter is not None]
    return LoraStep.build(rows, device)


def _steering_index(step: _Step, deltas: DeltaTable, hooks: StepHooks, total: int) -> None:
    """Per steered layer, an index from every packed token into that layer's delta table."""
    if not any(row.steer_ids for row in step.rows):
        return
    for layer in deltas.layers():
        entries: list[int] = []
        counts: list[int] = []
        for row in step.decode:
            entries.append(row.steer_ids.get((layer, "response"), 0))
            counts.append(1)
        for row, a, b in step.chunks:
            entries.append(row.steer_ids.get((layer, "prompt"), 0))
            counts.append(b - a)
        if not any(entries):
            continue
        table = deltas.tensor(layer)
        index = torch.repeat_interleave(torch.tensor(entries, device=table.device),
                                        torch.tensor(counts, device=table.device), output_size=total)
        hooks.steer[layer] = (table, index)


class Engine:
    """Continuous batching with chunked prefill over one :class:`LoadedModel`.

    Example::

        engine = Engine(lm, max_batch_size=32, max_waiting=128)
        engine.start()
        async for event in engine.generate(GenerationRequest(prompt_ids=ids)):
            ...   # PrefillDone, then TokenOut*, then Done
        engine.shutdown()

    ``max_batch_size`` rows run at once, each in its own cache slot of ``max_model_len``
    tokens; a step processes at most ``max_num_batched_tokens`` tokens. The engine mutates
    nothing outside itself but the hook state on ``lm``'s blocks and the model's attention
    implementation (plain forwards still get SDPA).
    """

    name = "hf"
    unsupported: frozenset[str] = frozenset()

    def __init__(self, lm: LoadedModel, *, max_batch_size: int = 32, max_waiting: int = 256,
                 max_model_len: int | None = None, max_num_batched_tokens: int = 512,
                 kv_cache_bytes: int | None = None, small_step_threads: int | None = None,
                 small_step_tokens: int = 4, attention_horizon: float | None = None, fused: bool = True):
        self.lm = lm
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        self.max_num_batched_tokens = max(max_num_batched_tokens, max_batch_size)
        config = text_config(lm.model.config)
        shape = AttentionShape.of(config)
        per_token = kvcache.SlotKVCache.bytes_per_token(num_layers=lm.num_layers, kv_heads=shape.kv_heads,
                                                          head_dim=shape.head_dim, dtype=lm.dtype)
        max_len = min(max_model_len or lm.context_length, lm.context_length)
        if kv_cache_bytes is not None:
            max_len = min(max_len, kv_cache_bytes // (per_token * max_batch_size))
        if max_len < 16:
            raise ValueError("the KV cache budget leaves fewer than 16 tokens per row; raise it or lower max_batch_size")
        self.max_model_len = int(max_len)
        self.attention_horizon = attention_horizon or default_attention_horizon(config, lm.input_device)
        self.kv_cache_bytes = per_token * max_batch_size * self.max_model_len
        self.cache = kvcache.SlotKVCache(num_layers=lm.num_layers, slots=max_batch_size, kv_heads=shape.kv_heads,
                                         head_dim=shape.head_dim, max_len=self.max_model_len, dtype=lm.dtype,
                                         device_of_layer=lm.block_device)
        # On CPU, steering.cpu_kernels computes every row's products, norms and attention in a fixed
        # order: a row's tokens never depend on who shares its step (None: oneDNN and SDPA).
        self.kernels = lm.kernels if lm.input_device.type == "cpu" else None
        if self.kernels is None and getattr(config, "attn_logit_softcapping", None):
            raise ValueError(f"{lm.name} caps its attention logits (attn_logit_softcapping), which this engine "
                             "computes only with its CPU kernels: serve it on the CPU with PERSONA_CPU_KERNELS=1, "
                             "or with --engine vllm")
        lm.model.set_attn_implementation(kvcache.register())
        self.hooks = SteeringHooks(lm.blocks, lm.model.get_input_embeddings())
        # Llama-style models run the engine's fused forward (steering.fastpath); others the HF one.
        self.fused = fastpath.shared_fused_decoder(lm.model, lm.blocks, self.kernels) if fused else None
        # The fused forward adds LoRA deltas itself; the HF forward gets them from hooks on the projections.
        self.lora_hooks = LoraHooks(lm.blocks) if self.fused is None else None
        self.deltas = DeltaTable(hidden_size=lm.hidden_size, dtype=lm.dtype, device_of_layer=lm.block_device)
        self.forward_passes = 0
        self._device = lm.input_device
        # Seeded rows sample where the logits are: the output head's device, the last GPU of a split.
        self._logits_device = lm.output_device
        # On CPU in bfloat16 a step of a few tokens (small-batch decode) barely gains from a second
        # thread, while the event loop that streams the tokens needs a core: such steps run with
        # one thread fewer than the rest (see _threads_for). In float32 the same steps read twice
        # the bytes and gained from every thread (measured on a 2-core AVX2 host over HTTP: 8 rows
        # 55-57 tok/s with two threads against 42 with one), so they keep them all.
        self.threads = torch.get_num_threads()
        self.small_step_tokens = small_step_tokens
        if small_step_threads is None:
            small_step_threads = max(1, self.threads - 1) if lm.dtype == torch.bfloat16 else self.threads
        self.small_step_threads = small_step_threads if self._device.type == "cpu" else self.threads
        self._placeholder_mask = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=self._device)
        self.scheduler = Scheduler(max_batch_size=max_batch_size, max_waiting=max_waiting,
                                   max_num_batched_tokens=self.max_num_batched_tokens,
                                   attention_horizon=self.attention_horizon)
        self._wake = threading.Condition()
        self._uids = itertools.count()
        self._outbox: list[tuple[_Handle, object]] = []
        self._stopping = False
        self._draining = False
        self._dead: BaseException | None = None
        self._thread: threading.Thread | None = None

    # ---- public surface ------------------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self.scheduler.rows)

    @property
    def waiting(self) -> int:
        return len(self.scheduler.pending)

    # The scheduler's state under the names tests and tools have used.
    @property
    def _pending(self) -> collections.deque[_Row]:
        return self.scheduler.pending

    @property
    def _free_slots(self) -> list[int]:
        return self.scheduler.free_slots

    def _chunk_cost(self, past: int, n: int) -> float:
        return self.scheduler.chunk_cost(past, n)

    @property
    def alive(self) -> bool:
        """False once the worker thread has died (``/ready`` then answers 503)."""
        return self._dead is None and (self._thread is None or self._thread.is_alive())

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="persona-engine", daemon=True)
        self._thread.start()

    async def astart(self) -> None:
        """:meth:`start`, for callers that start engines from an event loop (the server)."""
        self.start()

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
        if self.lora_hooks is not None:
            self.lora_hooks.remove()

    def check(self, request: GenerationRequest) -> None:
        """Raise :class:`RequestTooLongError` if ``request`` cannot fit a cache slot."""
        n = len(request.prompt_ids)
        if n == 0:
            raise RequestTooLongError("the prompt is empty")
        if request.score_from is not None and not 1 <= request.score_from <= n:
            raise ValueError(f"score_from must lie in 1..{n} (the prompt's length), not {request.score_from}")
        if n + request.sampling.max_new_tokens > self.max_model_len:
            raise RequestTooLongError(
                f"the prompt has {n} tokens and {request.sampling.max_new_tokens} more were asked for; "
                f"this server's max_model_len is {self.max_model_len}")

    def _new_row(self, request: GenerationRequest, handle: _Handle) -> _Row:
        self.check(request)
        now = time.monotonic()
        return _Row(request=request, handle=handle, uid=next(self._uids),
                    generator=make_generator(request.sampling.seed, self._logits_device), submitted=now,
                    deadline=now + request.timeout_s if request.timeout_s else None)

    def _enqueue(self, row: _Row) -> None:
        with self._wake:
            if self._dead is not None:
                raise EngineDeadError("the generation engine has stopped; the server must be restarted")
            if self._stopping or self._draining:
                raise DrainingError("the server is shutting down; retry on another replica")
            self.scheduler.queue(row)
            self._wake.notify()

    def add_request(self, request: GenerationRequest) -> list:
        """Queue ``request`` for a caller that drives the engine with :meth:`step` itself (no
        worker thread); its events are appended to the returned list as steps produce them."""
        events: list = []
        self._enqueue(self._new_row(request, _Handle(loop=None, events=events)))
        return events

    def step(self) -> bool:
        """Run one scheduling step in the calling thread; False when there was nothing to do.

        The worker thread calls this in its loop; tests and offline tools may call it directly
        instead of :meth:`start`, which makes the order of joins and leaves exact."""
        threads = torch.get_num_threads()
        try:
            return self._step()
        finally:
            if torch.get_num_threads() != threads:  # the caller's thread keeps its own setting
                torch.set_num_threads(threads)

    def _step(self) -> bool:
        with self._wake:
            self._expire_pending()
            self._admit()
        work = self._schedule()
        if work.rows:
            threads = self._threads_for(work)
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)  # this thread's OpenMP team (threads already running keep theirs)
            self._run_step(work)
        self._release_finished()
        self._flush()
        return bool(work.rows)

    async def generate(self, request: GenerationRequest):
        """Queue ``request`` and yield its events; closing the stream cancels the request.

        Raises :class:`QueueFullError` at once when the queue is full, :class:`RequestTooLongError`
        when it cannot fit, :class:`EngineDeadError` when the worker has died.
        """
        handle = _Handle(loop=asyncio.get_running_loop(), events=asyncio.Queue())
        row = self._new_row(request, handle)
        self._enqueue(row)
        try:
            while True:
                event = await handle.events.get()
                if isinstance(event, Exception):
                    raise event
                yield event
                if isinstance(event, Done):
                    return
        finally:
            handle.cancelled = True
            with self._wake:  # a request that leaves while queued stops counting toward max_waiting at once
                self.scheduler.leave(row)

    # ---- worker --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self._wake:
                        while not self._stopping and not self.scheduler.pending and not self.scheduler.rows:
                            self._wake.wait()
                        if self._stopping:
                            break
                    self._step()
            self._fail_all(EngineError("the engine shut down"))
        except BaseException as exc:  # the loop itself broke: fail everyone at once, never hang
            log.exception("the engine's worker died")
            self._dead = exc
            self._fail_all(EngineDeadError(f"the generation engine stopped: {type(exc).__name__}: {exc}"))
        finally:
            self._flush()

    # ---- scheduling (the Scheduler decides; the engine fails and frees) ------------------

    def _expire_pending(self) -> None:
        for row in self.scheduler.expire_queued(time.monotonic()):
            self._emit(row, DeadlineExceededError(
                f"request exceeded its deadline of {row.request.timeout_s:g} s while queued"))

    def _admit(self) -> None:
        self.scheduler.admit(self._join)

    def _join(self, row: _Row) -> bool:
        """Write ``row``'s steering into the delta tables; False (the row failed) if that fails."""
        try:
            row.steer_ids = self.deltas.add(row.request.steering)
        except Exception as exc:  # the row fails before it takes a slot
            log.exception("request %s failed to join", row.request.request_id or row.uid)
            self._fail_row(row, EngineError(f"generation failed: {type(exc).__name__}: {exc}"))
            return False
        return True

    def _schedule(self) -> _Step:
        for row in self.scheduler.overdue(time.monotonic()):
            self._fail_row(row, DeadlineExceededError(f"request exceeded its deadline of {row.request.timeout_s:g} s"))
        return self.scheduler.plan()

    def _threads_for(self, step: _Step) -> int:
        """Intra-op threads for ``step``: ``small_step_threads`` up to ``small_step_tokens`` tokens."""
        tokens = len(step.decode) + sum(b - a for _row, a, b in step.chunks)
        return self.small_step_threads if tokens <= self.small_step_tokens else self.threads

    def _run_step(self, step: _Step, retry: bool = True) -> None:
        try:
            logits, packed = self._forward(step)
        except Exception as exc:
            log.exception("forward pass failed")
            if not retry:
                for row in step.rows:
                    self._fail_row(row, EngineError(f"generation failed: {type(exc).__name__}: {exc}"))
                return
            # Retry row by row: rewriting the same tokens at the same cache positions is harmless,
            # so only a row that fails on its own ends, and a one-off fault costs nobody anything.
            for row in step.decode:
                self._run_step(_Step([row], []), retry=False)
            for chunk in step.chunks:
                self._run_step(_Step([], [chunk]), retry=False)
            return
        self._outcome(step, packed, logits)

    def _guarded(self, row: _Row, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as exc:  # one row's bad input or callback fails that row only
            log.exception("request %s failed", row.request.request_id or row.uid)
            self._fail_row(row, EngineError(f"generation failed: {type(exc).__name__}: {exc}"))

    # ---- the forward ---------------------------------------------------------------------

    def _forward(self, step: _Step) -> tuple[torch.Tensor, PackedStep]:
        """Lay ``step`` out (:func:`lay_out`) and run the model on it: the unit that
        :meth:`_run_step` retries row by row when it raises."""
        packed = lay_out(step, self.cache, self.deltas, self._device, self.kernels)
        return self._run_model(packed), packed

    def _run_model(self, packed: PackedStep) -> torch.Tensor:
        """The forward itself: one pass over the packed tokens with their steering, captures and
        adapter deltas; returns the logits at ``packed.keep``, in that order.

        Writes the step's keys and values into the cache (zero-filling it first as far as the
        step reaches) and fills ``packed.hooks`` (captured states, span sums); the steering and
        adapter hooks carry this step's state only for the call."""
        dev = self._device
        # Zero-fill is only ever done ahead of every position written or read in this step.
        self.cache.ensure(max(packed.positions) + 1)
        self.forward_passes += 1
        with self.hooks.state(packed.hooks):
            if self.fused is not None:
                return self.fused(torch.tensor(packed.ids, device=dev), torch.tensor(packed.positions, device=dev),
                                  packed.attention, torch.tensor(packed.keep, device=dev), self.hooks, lora=packed.lora)
            with self.lora_hooks.state(packed.lora):
                out = self.lm.model(
                    input_ids=torch.tensor([packed.ids], device=dev),
                    position_ids=torch.tensor([packed.positions], device=dev),
                    attention_mask=self._placeholder_mask,
                    use_cache=False,
                    # On the CPU: it indexes the last block's states, which a device map may put elsewhere.
                    logits_to_keep=torch.tensor(packed.keep),
                    persona_layout=packed.attention,
                )
        return out.logits[0]

    # ---- per-row outcome -----------------------------------------------------------------

    def _outcome(self, step: _Step, packed: PackedStep, logits: torch.Tensor) -> None:
        """The per-row outcome of a forward: what each row's logits and captured states mean.

        Owns: the log-probabilities of scored prompt tokens, a prefill's progress (``computed``,
        the copy to the rest of its prefill group, span sums), the prefill's report
        (:class:`PrefillDone`: captured states, probe projections, a block, remediations),
        sampling, and each new token's :class:`TokenOut` and stop checks (:class:`Done`). Each
        row's part runs on its own: a fault there fails that row (an :class:`EngineError` event,
        ``done``) and no other, and the end of the step frees its slot."""
        self._score(packed, logits)
        for row, a, b in step.chunks:
            row.computed = b
            if row.request.prefill_group is not None and a < row.prompt_len - 1 <= b:
                self._share_prefill(row)
            for layer, total in packed.hooks.sums.get(row.uid, {}).items():
                row.span_sums[layer] = row.span_sums[layer] + total if layer in row.span_sums else total
            if b == row.prompt_len and not row.done:
                self._guarded(row, self._prefill_done, row, packed, logits)
        sampling = [(j, r) for j, r in enumerate(packed.logit_rows)
                    if not r.done and r.request.sampling.max_new_tokens > 0]
        if sampling:
            picks = self._sample([r for _j, r in sampling], logits, [j for j, _r in sampling])
            for (_j, row), picked in zip(sampling, picks):
                if picked is not None:
                    self._guarded(row, self._push_token, row, picked, packed)

    def _score(self, packed: PackedStep, logits: torch.Tensor) -> None:
        """Append the log-probabilities of this step's scored prompt tokens to their rows; a
        failure fails its row only (one small call per row, so no row sees another's fault)."""
        for row, at, ids in packed.scoring:
            self._guarded(row, _extend_scores, row, logits[at : at + len(ids)], ids)

    def _share_prefill(self, reader: _Row) -> None:
        """Copy ``reader``'s cache of all but its last prompt token to the rows of its group that
        have not started reading; the copy equals what their own prefill would have written."""
        shared = reader.prompt_len - 1
        ask = reader.request
        for row in self.scheduler.rows:
            other = row.request
            if (row is reader or row.done or row.computed or other.prefill_group != ask.prefill_group
                    or other.prompt_ids != ask.prompt_ids or other.steering is not ask.steering
                    or other.adapter is not ask.adapter or other.mean_from is not None or other.score_from is not None):
                continue
            for tensor in self.cache.keys + self.cache.values:
                tensor[row.slot, :, :shared].copy_(tensor[reader.slot, :, :shared])
            row.computed = shared

    def _prefill_done(self, row: _Row, packed: PackedStep, logits: torch.Tensor) -> None:
        request = row.request
        states = {layer: packed.state(layer, row).cpu() for layer in request.capture_layers}
        projections = {}
        blocked = False
        for layer, directions in request.probes.items():
            state = packed.state(layer, row)
            values = directions.to(state.device, torch.float32) @ state
            limit = request.block_above.get(layer)
            if limit is not None:
                blocked = blocked or bool((values > limit.to(values.device)).any())
            projections[layer] = values.tolist()
        span_mean = None
        if request.mean_from is not None:
            count = row.prompt_len - request.mean_from
            span_mean = torch.stack([row.span_sums[layer].cpu() / count for layer in range(self.lm.num_layers + 1)])
        options = None
        if request.option_ids:
            options = option_logprobs(logits[packed.logit_rows.index(row)], request.option_ids)
        scored = row.scored if request.score_from is not None else None
        remediated = () if blocked else self._remediate(row, projections)
        self._emit(row, PrefillDone(states=states, projections=projections, queue_wait_s=row.queue_wait_s,
                                    span_mean=span_mean, option_logprobs=options, prompt_logprobs=scored,
                                    blocked=blocked, remediated=remediated))
        if blocked:
            row.done = True
            self._emit(row, Done("blocked", row.prompt_len, 0))
        elif request.sampling.max_new_tokens == 0:  # prefill only (calibration, extraction, assessment)
            row.done = True
            self._emit(row, Done("length", row.prompt_len, 0))

    def _remediate(self, row: _Row, projections: dict[int, list[float]]) -> tuple[str, ...]:
        """Switch on the remediations whose probes read above their limits: from the next step on,
        the row's generated tokens carry them on top of its own response steering."""
        tripped = [c for c in row.request.remediations if projections[c.layer][c.index] > c.limit]
        if not tripped:
            return ()
        response = row.request.steering.response if row.request.steering is not None else {}
        for c in tripped:
            response = add_deltas(response, c.response)
        row.steer_ids = self.deltas.switch_response(row.steer_ids, response)
        return tuple(c.name for c in tripped)

    def _sample(self, rows: list[_Row], logits: torch.Tensor, positions: list[int]) -> list:
        index = torch.tensor(positions, device=logits.device)
        states = [self._sampler_state(r) for r in rows]
        try:
            return sample(logits.index_select(0, index), states)
        except Exception:
            # Find the row whose parameters broke the batched call; the others still get tokens.
            picks = []
            for j, (row, state) in enumerate(zip(rows, states)):
                try:
                    picks.append(sample(logits.index_select(0, index[j:j + 1]), [state])[0])
                except Exception as exc:
                    self._fail_row(row, EngineError(f"sampling failed: {type(exc).__name__}: {exc}"))
                    picks.append(None)
            return picks

    def _sampler_state(self, row: _Row) -> RowState:
        params = row.request.sampling
        block: tuple[int, ...] = ()
        if len(row.output) < params.min_tokens:
            block = tuple(self.lm.eos_token_ids) + params.stop_token_ids
        elif params.ignore_eos:
            block = tuple(self.lm.eos_token_ids)
        return RowState(params, row.generator, row.request.prompt_ids, row.output, block)

    def _push_token(self, row: _Row, picked, packed: PackedStep) -> None:
        params = row.request.sampling
        decoded = row.decoding and row.output  # the token fed in this step was a generated one
        row.output.append(picked.token)
        projections = None
        if row.request.response_probes and decoded:
            projections = {}
            for layer, directions in row.request.response_probes.items():
                state = packed.state(layer, row)
                projections[layer] = (directions.to(state.device, torch.float32) @ state).tolist()
        self._emit(row, TokenOut(picked.token, picked.logprob, picked.top, projections))
        finish = None
        if (picked.token in self.lm.eos_token_ids and not params.ignore_eos) or picked.token in params.stop_token_ids:
            finish = "stop"
        elif len(row.output) >= params.max_new_tokens:
            finish = "length"
        if finish is not None:
            row.done = True
            self._emit(row, Done(finish, row.prompt_len, len(row.output)))

    # ---- bookkeeping ---------------------------------------------------------------------

    def _emit(self, row: _Row, event) -> None:
        self._outbox.append((row.handle, event))

    def _flush(self) -> None:
        """Hand this step's events to their event loops, one call per loop."""
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for handle, event in self._outbox:
            if handle.loop is None:
                handle.events.append(event)
            else:
                by_loop.setdefault(handle.loop, []).append((handle, event))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that client's event loop is gone
                for handle, _event in items:
                    handle.cancelled = True

    def _fail_row(self, row: _Row, exc: Exception) -> None:
        if not row.done:
            row.done = True
            self._emit(row, exc)

    def _release_finished(self) -> None:
        self.scheduler.release(self._free)

    def _free(self, row: _Row) -> None:
        """Give back what a finished row holds: its delta-table entries and its slot's cache."""
        self.deltas.release(row.steer_ids)
        self.cache.clear(row.slot, row.length)

    def _fail_all(self, exc: Exception) -> None:
        with self._wake:
            rows = self.scheduler.take_all()
        for row in rows:
            self._fail_row(row, exc)


# How much slower attention runs than the linear layers per multiply-add, on CPU. Measured on the
# development machine (2-core AVX512-BF16 CPU, SmolLM2-135M, bfloat16, the CPU kernels as of
# 2026-12-06, quiet machine): 511-token chunks of a 2,561-token prompt took 538, 747, 987, 1,201
# and 1,429 ms (median of 3) at 0-2,044 cached tokens; a least-squares fit gives a horizon of 964
# tokens against 3,072 by operation count, a slowdown of 3.2. (Before those kernels the same fit
# gave 1.95: attention got faster, but the products faster still.) On CUDA none is assumed.
CPU_ATTENTION_SLOWDOWN = 3.2


def default_attention_horizon(config, device: torch.device) -> float:
    """Context length at which one token's attention costs as much as its linear layers: the
    linear layers' multiply-adds per token over attention's per cached token (per layer, QK and
    PV: 2 x heads x head_dim), divided by how much slower attention runs on ``device``."""
    hidden = config.hidden_size
    shape = AttentionShape.of(config)
    heads, kv_heads, head_dim = shape.heads, shape.kv_heads, shape.head_dim
    inner = getattr(config, "intermediate_size", None) or 4 * hidden
    gated = 3 if getattr(config, "hidden_act", "") in ("silu", "swiglu", "gelu_pytorch_tanh") else 2
    linear = hidden * head_dim * (2 * heads + 2 * kv_heads) + gated * hidden * inner
    horizon = linear / (2 * heads * head_dim)
    return horizon / (CPU_ATTENTION_SLOWDOWN if device.type == "cpu" else 1.0)


def _extend_scores(row: _Row, logits: torch.Tensor, targets: list[int]) -> None:
    index = torch.tensor(targets, device=logits.device)[:, None]
    row.scored.extend(torch.log_softmax(logits.float(), dim=-1).gather(1, index)[:, 0].tolist())


def _deliver(items) -> None:
    for handle, event in items:
        if not handle.cancelled:
            handle.events.put_nowait(event)
