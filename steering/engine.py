"""The generation engine: one worker thread owns the model and runs a step loop over token ids.

Flow: :meth:`Engine.generate` puts a request on a bounded queue and returns an async stream
of events. Each step has a token budget: one token for every decoding row, then chunks of
the prompts being prefilled (first come, first served) until the budget is spent. All of
them run as one packed forward over a preallocated slot cache (:mod:`steering.kvcache`), so
an arriving prompt delays running rows by at most one step, and rows join and leave without
moving anyone's cache. Every token carries an index into per-layer tables of steering
deltas (:class:`steering.steer.DeltaTable`), so rows steer independently and rows that do
not steer cost nothing. Sampling runs on the model's device with per-row parameters.

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
    """The rows of one step and where their tokens sit in the packed sequence."""

    decode: list[_Row]
    chunks: list[tuple[_Row, int, int]]  # (row, first prompt position, end position)
    # Filled by the forward: the packed position of each row's newest token, the rows whose
    # logits were kept (in logits order), and per layer where each captured token's state is.
    last: dict[_Row, int] = field(default_factory=dict)
    logit_rows: list[_Row] = field(default_factory=list)
    captured_at: dict[int, dict[int, int]] = field(default_factory=dict)
    # Prompt tokens scored in this step: per row, (first kept logit, target token ids); the
    # kept logits of a row's scored positions follow those of the sampling rows, in order.
    scoring: list[tuple[_Row, int, list[int]]] = field(default_factory=list)

    @property
    def rows(self) -> list[_Row]:
        return self.decode + [row for row, _a, _b in self.chunks]


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
                 small_step_tokens: int = 16, attention_horizon: float | None = None, fused: bool = True):
        self.lm = lm
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        self.max_num_batched_tokens = max(max_num_batched_tokens, max_batch_size)
        config = lm.model.config.get_text_config() if hasattr(lm.model.config, "get_text_config") else lm.model.config
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or lm.hidden_size // heads
        per_token = kvcache.SlotKVCache.bytes_per_token(num_layers=lm.num_layers, kv_heads=kv_heads,
                                                          head_dim=head_dim, dtype=lm.dtype)
        max_len = min(max_model_len or lm.context_length, lm.context_length)
        if kv_cache_bytes is not None:
            max_len = min(max_len, kv_cache_bytes // (per_token * max_batch_size))
        if max_len < 16:
            raise ValueError("the KV cache budget leaves fewer than 16 tokens per row; raise it or lower max_batch_size")
        self.max_model_len = int(max_len)
        self.attention_horizon = attention_horizon or default_attention_horizon(config, lm.input_device)
        self.kv_cache_bytes = per_token * max_batch_size * self.max_model_len
        self.cache = kvcache.SlotKVCache(num_layers=lm.num_layers, slots=max_batch_size, kv_heads=kv_heads,
                                         head_dim=head_dim, max_len=self.max_model_len, dtype=lm.dtype,
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
        self._pending: collections.deque[_Row] = collections.deque()
        self._wake = threading.Condition()
        self._rows: list[_Row] = []
        self._free_slots = list(range(max_batch_size - 1, -1, -1))
        self._uids = itertools.count()
        self._outbox: list[tuple[_Handle, object]] = []
        self._stopping = False
        self._draining = False
        self._dead: BaseException | None = None
        self._thread: threading.Thread | None = None

    # ---- public surface ------------------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def waiting(self) -> int:
        return len(self._pending)

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
            # Every request passes through _pending, but only those beyond the free slots wait: as
            # in the vLLM engine, refused once running + waiting reach max_batch_size + max_waiting
            # (so max_waiting=0 means no queue, not no service).
            if len(self._pending) >= self.max_waiting + len(self._free_slots):
                raise QueueFullError(max(0, len(self._pending) - len(self._free_slots)))
            self._pending.append(row)
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
            with self._wake:
                # A request that leaves while queued stops counting toward max_waiting at once.
                # (Not deque.remove + ValueError: for a row already admitted, the usual case, that
                # formats the row into the error message on every request's exit.)
                if row in self._pending:
                    self._pending.remove(row)

    # ---- worker --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self._wake:
                        while not self._stopping and not self._pending and not self._rows:
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

    def _expire_pending(self) -> None:
        now = time.monotonic()
        for row in list(self._pending):
            if row.handle.cancelled:
                self._pending.remove(row)
            elif row.deadline is not None and now > row.deadline:
                self._pending.remove(row)
                self._emit(row, DeadlineExceededError(
                    f"request exceeded its deadline of {row.request.timeout_s:g} s while queued"))

    def _admit(self) -> None:
        while self._pending and self._free_slots:
            row = self._pending.popleft()
            row.queue_wait_s = time.monotonic() - row.submitted
            try:
                row.steer_ids = self.deltas.add(row.request.steering)
            except Exception as exc:  # the row fails before it takes a slot
                log.exception("request %s failed to join", row.request.request_id or row.uid)
                self._fail_row(row, EngineError(f"generation failed: {type(exc).__name__}: {exc}"))
                continue
            row.slot = self._free_slots.pop()
            self._rows.append(row)

    def _schedule(self) -> _Step:
        now = time.monotonic()
        for row in self._rows:
            if row.handle.cancelled:
                row.done = True
            elif row.deadline is not None and now > row.deadline and not row.done:
                self._fail_row(row, DeadlineExceededError(f"request exceeded its deadline of {row.request.timeout_s:g} s"))
        decode = [r for r in self._rows if not r.done and r.decoding]
        budget = self.max_num_batched_tokens - len(decode)
        # The same budget in work: a prompt token costs 1 plus its attention to the tokens before
        # it, so a chunk deep into a long prompt gets fewer tokens than a fresh one.
        work = self._chunk_cost(0, self.max_num_batched_tokens) - len(decode)
        chunks = []
        reading: set[str] = set()  # prefill groups one of whose rows reads the shared prompt
        for row in self._rows:
            if budget <= 0:
                break
            if row.done or row.decoding:
                continue
            group = row.request.prefill_group
            if group is not None:
                if row.computed == 0 and row.prompt_len > 1 and group in reading:
                    continue  # it gets the reader's cache (_share_prefill)
                reading.add(group)
            n = min(row.prompt_len - row.computed, budget, self._affordable(row.computed, work))
            if n <= 0:
                if chunks:
                    break
                n = 1  # the first chunk of a step always advances
            chunks.append((row, row.computed, row.computed + n))
            budget -= n
            work -= self._chunk_cost(row.computed, n)
        return _Step(decode, chunks)

    def _chunk_cost(self, past: int, n: int) -> float:
        """Work of ``n`` prompt tokens after ``past`` cached ones, in fresh-token units: each
        token costs 1 plus (tokens it attends to) / ``attention_horizon``."""
        return n + n * (past + (n - 1) / 2) / self.attention_horizon

    def _affordable(self, past: int, work: float) -> int:
        """The most tokens after ``past`` cached ones whose :meth:`_chunk_cost` fits in ``work``."""
        if work <= 0:
            return 0
        h = self.attention_horizon
        b = 1 + (past - 0.5) / h
        n = int((math.sqrt(b * b + 2 * work / h) - b) * h)
        while n > 0 and self._chunk_cost(past, n) > work:  # floating-point edge
            n -= 1
        return n

    def _threads_for(self, step: _Step) -> int:
        """Intra-op threads for ``step``: ``small_step_threads`` up to ``small_step_tokens`` tokens."""
        tokens = len(step.decode) + sum(b - a for _row, a, b in step.chunks)
        return self.small_step_threads if tokens <= self.small_step_tokens else self.threads

    def _run_step(self, step: _Step, retry: bool = True) -> None:
        try:
            logits, hooks = self._forward(step)
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
        self._score(step, logits)
        for row, a, b in step.chunks:
            row.computed = b
            if row.request.prefill_group is not None and a < row.prompt_len - 1 <= b:
                self._share_prefill(row)
            for layer, total in hooks.sums.get(row.uid, {}).items():
                row.span_sums[layer] = row.span_sums[layer] + total if layer in row.span_sums else total
            if b == row.prompt_len and not row.done:
                self._guarded(row, self._prefill_done, row, step, hooks, logits)
        sampling = [(j, r) for j, r in enumerate(step.logit_rows)
                    if not r.done and r.request.sampling.max_new_tokens > 0]
        if sampling:
            picks = self._sample([r for _j, r in sampling], logits, [j for j, _r in sampling])
            for (_j, row), picked in zip(sampling, picks):
                if picked is not None:
                    self._guarded(row, self._push_token, row, picked, step, hooks)

    def _guarded(self, row: _Row, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as exc:  # one row's bad input or callback fails that row only
            log.exception("request %s failed", row.request.request_id or row.uid)
            self._fail_row(row, EngineError(f"generation failed: {type(exc).__name__}: {exc}"))

    def _forward(self, step: _Step):
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
        dev = self._device
        nd = len(step.decode)
        # Zero-fill is only ever done ahead of every position written or read in this step.
        self.cache.ensure(max(positions) + 1)
        layout = kvcache.StepLayout(
            cache=self.cache,
            slots=torch.tensor(slots, device=dev),
            positions=torch.tensor(positions, device=dev),
            num_decode=nd,
            chunks=chunks,
            kernels=self.kernels,
        )
        if nd:
            decode_slots = [r.slot for r in step.decode]
            span = max(decode_slots) + 1
            lengths = [1] * span
            for row in step.decode:
                lengths[row.slot] = row.length
            width = max(lengths)
            layout.decode_span = span
            layout.decode_dense = decode_slots == list(range(nd))
            layout.decode_slots = torch.tensor(decode_slots, device=dev)
            layout.decode_mask = (torch.arange(width, device=dev)[None, :]
                                  < torch.tensor(lengths, device=dev)[:, None])[:, None, None, :]
        # Token positions (in the packed step) of the rows whose next token is sampled here,
        # and of the tokens whose states are captured.
        capture: dict[int, list[int]] = {}
        for i, row in enumerate(step.decode):
            step.last[row] = i
            step.logit_rows.append(row)
            for layer in row.request.response_probes:
                capture.setdefault(layer, []).append(i)
        for chunk, (row, _a, b) in zip(chunks, step.chunks):
            if b != row.prompt_len:
                continue
            last = step.last[row] = chunk.end - 1
            if row.request.sampling.max_new_tokens > 0 or row.request.option_ids:
                step.logit_rows.append(row)
            # The last prompt token's state also produces the first token (response probes).
            for layer in row.request.capture_layers | row.request.probes.keys() | row.request.response_probes.keys():
                capture.setdefault(layer, []).append(last)
        step.captured_at = {layer: {token: k for k, token in enumerate(where)} for layer, where in capture.items()}
        hooks.capture = {layer: torch.tensor(where, device=dev) for layer, where in capture.items()}
        self._steer(step, hooks, len(ids))
        lora = self._lora(step, chunks)
        keep = [step.last[row] for row in step.logit_rows]
        for chunk, (row, a, b) in zip(chunks, step.chunks):
            score_from = row.request.score_from
            if score_from is None:
                continue
            # The logit at position q predicts the token at q + 1: this chunk scores the prompt
            # tokens after its positions from score_from - 1 on (never past the prompt's end).
            first, end = max(a, score_from - 1), min(b, row.prompt_len - 1)
            if first < end:
                step.scoring.append((row, len(keep), row.request.prompt_ids[first + 1 : end + 1]))
                keep.extend(range(chunk.start + first - a, chunk.start + end - a))
        keep = keep or [len(ids) - 1]
        self.forward_passes += 1
        with self.hooks.state(hooks):
            if self.fused is not None:
                return self.fused(torch.tensor(ids, device=dev), torch.tensor(positions, device=dev), layout,
                                  torch.tensor(keep, device=dev), self.hooks, lora=lora), hooks
            with self.lora_hooks.state(lora):
                out = self.lm.model(
                    input_ids=torch.tensor([ids], device=dev),
                    position_ids=torch.tensor([positions], device=dev),
                    attention_mask=self._placeholder_mask,
                    use_cache=False,
                    # On the CPU: it indexes the last block's states, which a device map may put elsewhere.
                    logits_to_keep=torch.tensor(keep),
                    persona_layout=layout,
                )
        return out.logits[0], hooks

    def _lora(self, step: _Step, chunks: list[kvcache.Chunk]) -> LoraStep | None:
        """The packed positions of each adapter's tokens in this step (None when no row has one)."""
        rows = [(row.request.adapter, [i]) for i, row in enumerate(step.decode) if row.request.adapter is not None]
        rows += [(row.request.adapter, list(range(chunk.start, chunk.end)))
                 for chunk, (row, _a, _b) in zip(chunks, step.chunks) if row.request.adapter is not None]
        return LoraStep.build(rows, self._device)

    def _steer(self, step: _Step, hooks: StepHooks, total: int) -> None:
        """Per steered layer, an index from every packed token into that layer's delta table."""
        if not any(row.steer_ids for row in step.rows):
            return
        for layer in self.deltas.layers():
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
            table = self.deltas.tensor(layer)
            index = torch.repeat_interleave(torch.tensor(entries, device=table.device),
                                            torch.tensor(counts, device=table.device), output_size=total)
            hooks.steer[layer] = (table, index)

    def _score(self, step: _Step, logits: torch.Tensor) -> None:
        """Append the log-probabilities of this step's scored prompt tokens to their rows; a
        failure fails its row only (one small call per row, so no row sees another's fault)."""
        for row, at, ids in step.scoring:
            self._guarded(row, _extend_scores, row, logits[at : at + len(ids)], ids)

    def _share_prefill(self, reader: _Row) -> None:
        """Copy ``reader``'s cache of all but its last prompt token to the rows of its group that
        have not started reading; the copy equals what their own prefill would have written."""
        shared = reader.prompt_len - 1
        ask = reader.request
        for row in self._rows:
            other = row.request
            if (row is reader or row.done or row.computed or other.prefill_group != ask.prefill_group
                    or other.prompt_ids != ask.prompt_ids or other.steering is not ask.steering
                    or other.adapter is not ask.adapter or other.mean_from is not None or other.score_from is not None):
                continue
            for tensor in self.cache.keys + self.cache.values:
                tensor[row.slot, :, :shared].copy_(tensor[reader.slot, :, :shared])
            row.computed = shared

    @staticmethod
    def _state(step: _Step, hooks: StepHooks, layer: int, row: _Row) -> torch.Tensor:
        return hooks.captured[layer][step.captured_at[layer][step.last[row]]]

    def _prefill_done(self, row: _Row, step: _Step, hooks: StepHooks, logits: torch.Tensor) -> None:
        request = row.request
        states = {layer: self._state(step, hooks, layer, row).cpu() for layer in request.capture_layers}
        projections = {}
        blocked = False
        for layer, directions in request.probes.items():
            state = self._state(step, hooks, layer, row)
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
            options = option_logprobs(logits[step.logit_rows.index(row)], request.option_ids)
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

    def _push_token(self, row: _Row, picked, step: _Step, hooks: StepHooks) -> None:
        params = row.request.sampling
        decoded = row.decoding and row.output  # the token fed in this step was a generated one
        row.output.append(picked.token)
        projections = None
        if row.request.response_probes and decoded:
            projections = {}
            for layer, directions in row.request.response_probes.items():
                state = self._state(step, hooks, layer, row)
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
        keep = []
        for row in self._rows:
            if row.done or row.handle.cancelled:
                row.done = True
                self.deltas.release(row.steer_ids)
                self.cache.clear(row.slot, row.length)
                self._free_slots.append(row.slot)
            else:
                keep.append(row)
        if len(keep) != len(self._rows):
            self._rows = keep
            # Lowest slots first keeps the running rows packed at the front of the cache.
            self._free_slots.sort(reverse=True)

    def _fail_all(self, exc: Exception) -> None:
        with self._wake:
            rows = list(self._pending) + self._rows
            self._pending.clear()
        for row in rows:
            self._fail_row(row, exc)
        self._rows = []


# How much slower attention runs than the linear layers per multiply-add, on CPU. Measured on the
# development machine (2-core AVX512-BF16 CPU, SmolLM2-135M, bfloat16): 511-token chunks of a
# 2,560-token prompt took 848, 943, 1,218 and 1,274 ms at 511-2,044 cached tokens; a least-squares
# fit gives a horizon of 1,573 tokens against 3,072 by operation count, a slowdown of 1.95. On
# CUDA none is assumed.
CPU_ATTENTION_SLOWDOWN = 2.0


def default_attention_horizon(config, device: torch.device) -> float:
    """Context length at which one token's attention costs as much as its linear layers: the
    linear layers' multiply-adds per token over attention's per cached token (per layer, QK and
    PV: 2 x heads x head_dim), divided by how much slower attention runs on ``device``."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
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
