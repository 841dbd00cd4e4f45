"""From a validated OpenAI request to engine events and back to an OpenAI response.

Shared by ``/v1/chat/completions`` and ``/v1/completions``; each supplies a
:class:`Renderer` for its response shapes. The engine returns token ids; text, stop
strings and deadlines are handled per request by :func:`steering.output.generate_text`, and
monitor verdicts here, in the event loop, so one request's failure never reaches another. One
:class:`RequestLifetime` per request owns its streams from submission to release."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from app.deps import ServerState
from app.errors import APIError, as_api_error, envelope
from app.schemas import SteeringField, _GenerationFields
from app.steering_policy import admit_steering
from steering.adapters import Adapter
from steering.engine import GenerationRequest, PrefillDone, TokenOut, UnsupportedOnEngineError
from steering.monitor import MonitorSnapshot, Reading, ResponseWatch
from steering.output import Finished, TokenDelta, generate_text
from steering.sampling import MAX_SEED, SamplingParams
from steering.steer import RowSteering


@dataclass
class Renderer:
    """Response shapes of one endpoint."""

    object_final: str
    object_chunk: str
    id_prefix: str
    final_choice: Callable[[int, str, str, dict | None], dict]  # (index, text, finish, logprobs) -> choice
    chunk_choice: Callable[[int, str | None, str | None, bool, dict | None], dict]  # (index, text, finish, first, logprobs)
    logprobs: Callable[[list[TokenOut], object, int], dict]  # (tokens, tokenizer, text offset) -> logprobs field


def check_model(state: ServerState, name: str) -> Adapter | None:
    """The adapter ``name`` names (None for the base model under either of its names); 404 naming
    ``model`` for anything else."""
    if name in (state.lm.name, "default"):
        return None
    if name in state.adapters:
        return state.adapters.get(name)
    loaded = f" or a loaded adapter ({', '.join(state.adapters.names())})" if state.adapters.names() else ""
    raise APIError(
        404, f"model '{name}' is not served here; use '{state.lm.name}'{loaded}", type="not_found_error",
        param="model", code="model_not_found",
    )


@dataclass
class MonitorContext:
    """What the monitors saw for one request (read in the event loop from the engine's projections)."""

    return_scores: bool
    snapshot: MonitorSnapshot | None = None
    steered_layers: frozenset[int] = frozenset()
    readings: list[Reading] | None = None
    watch: ResponseWatch | None = None
    engine_blocked: bool = False
    remediated: tuple[str, ...] = ()  # the monitors whose remediation steers this request's answer
    adapter: str = ""  # the metrics' adapter label: the adapter's name, "" for the base model

    def read(self, event: PrefillDone) -> None:
        self.engine_blocked = event.blocked
        self.remediated = event.remediated
        if self.snapshot:
            self.readings = self.snapshot.readings(event.projections, self.steered_layers)

    def flagged(self) -> list[str]:
        return [r.vector for r in self.readings or () if r.action != "allow"]

    def blocked(self) -> bool:
        return self.engine_blocked or any(r.action == "block" and r.mode == "enforce" for r in self.readings or ())

    def payload(self) -> dict | None:
        """The ``persona_monitor`` field, when the request was flagged or asked for scores."""
        tripped = self.watch is not None and self.watch.tripped is not None
        if not self.readings or not (self.return_scores or self.flagged() or tripped):
            return None
        out = {
            "read_at": "last prompt token, residual stream before this request's steering at the monitored layer",
            "scores": {r.vector: r.public() for r in self.readings},
        }
        if self.remediated:
            out["remediated"] = list(self.remediated)
        if self.watch is not None and self.watch.count:
            out["response_means"] = self.watch.means()
            if self.watch.tripped:
                out["stopped_by"] = self.watch.tripped
        return out


def resolve_request_steering(state: ServerState, field: SteeringField,
                             snapshot: MonitorSnapshot | None = None) -> RowSteering | None:
    """A request's ``steering`` field admitted by the server's steering policy and resolved to
    per-layer deltas. Every route that takes ``steering`` goes through here; a request that is
    monitored passes the snapshot its monitors read, so a monitor change in between cannot let
    through steering that the monitors reading this request forbid."""
    return admit_steering(field, state.registry, snapshot if snapshot is not None else state.monitors.snapshot(),
                          state.settings)


def count_steering(state: ServerState, steering: RowSteering | None) -> None:
    """Count an accepted request's steering use by vector."""
    for name in steering.vectors if steering else ():
        state.metrics.steering.labels(vector=name).inc()


def check_token_ids(state: ServerState, ids, what: str, param: str) -> None:
    """The one vocabulary-range rule for every field that carries token ids (prompts, stop ids,
    logit_bias keys, /detokenize): each in 0..V-1, else a 400 naming the field and the first bad
    id. ``param`` may hold ``{i}`` for the bad id's position."""
    vocab = len(state.lm.tokenizer)
    for i, token in enumerate(ids):
        if not 0 <= token < vocab:
            raise APIError(400, f"{what} must be in 0..{vocab - 1}; got {token}", param=param.format(i=i))


def _sampling(state: ServerState, body: _GenerationFields, max_new: int) -> SamplingParams:
    bias = []
    for key, value in (body.logit_bias or {}).items():
        if not key.lstrip("-").isdigit():
            raise APIError(400, f"logit_bias keys must be token ids; got {key[:20]!r}", param="logit_bias")
        check_token_ids(state, [int(key)], "logit_bias keys", "logit_bias")
        bias.append((int(key), float(value)))
    check_token_ids(state, body.stop_token_ids or (), "stop_token_ids", "stop_token_ids")
    defaults = state.sampling_defaults
    top_k = defaults.top_k if body.top_k is None else body.top_k
    return SamplingParams(
        max_new_tokens=max_new,
        temperature=defaults.temperature if body.temperature is None else body.temperature,
        top_p=defaults.top_p if body.top_p is None else body.top_p,
        top_k=max(top_k, 0),
        min_p=body.min_p or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=defaults.repetition_penalty if body.repetition_penalty is None else body.repetition_penalty,
        logit_bias=tuple(bias),
        seed=body.seed,
        stop=tuple(body.stop or ()),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        min_tokens=body.min_tokens,
        ignore_eos=body.ignore_eos,
        logprobs=body.logprob_count(),
    )


def require_lora(state: ServerState, param: str | None = "model") -> None:
    """501 where the engine runs without LoRA (vLLM's engine started without --enable-lora)."""
    if "adapters" in state.engine.unsupported:
        raise UnsupportedOnEngineError(f"LoRA adapters are off on the {state.engine.name} engine; start the server "
                                       "with --enable-lora (PERSONA_ENABLE_LORA=true) or --lora-modules", param=param)


def check_adapter_served(state: ServerState, adapter: Adapter | None) -> Adapter | None:
    """``adapter``, where the engine serves adapters (501 naming ``model`` otherwise)."""
    if adapter is not None:
        require_lora(state)
    return adapter


def build_request(state: ServerState, body: _GenerationFields, prompt_ids: list[int], prompt_param: str) -> tuple[GenerationRequest, MonitorContext]:
    """Apply the checks that need the model and registry; return what the engine runs."""
    settings, lm = state.settings, state.lm
    adapter = check_adapter_served(state, check_model(state, body.model))
    snapshot = state.monitors.snapshot()
    steering = resolve_request_steering(state, body.steering, snapshot)

    n_prompt = len(prompt_ids)
    if n_prompt == 0:
        raise APIError(400, "the prompt is empty", param=prompt_param)
    if settings.max_prompt_tokens is not None and n_prompt > settings.max_prompt_tokens:
        raise APIError(400, f"the prompt has {n_prompt} tokens; this server accepts at most {settings.max_prompt_tokens}",
                       param=prompt_param, code="prompt_too_long")
    context = state.engine.max_model_len
    room = context - n_prompt
    if room < 1:
        raise APIError(
            400,
            f"the prompt has {n_prompt} tokens; this server's max_model_len is {context} tokens "
            "and at least one must remain for the answer",
            param=prompt_param, code="context_length_exceeded",
        )
    asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
    field = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
    if asked is None:
        max_new = min(state.sampling_defaults.max_tokens, room)
    else:
        if asked > settings.max_tokens_limit:
            raise APIError(400, f"{field} must be at most {settings.max_tokens_limit}", param=field)
        if asked > room:
            raise APIError(
                400,
                f"{field} is {asked}, but the prompt has {n_prompt} tokens and max_model_len is "
                f"{context}: at most {room} tokens can be generated",
                param=field, code="context_length_exceeded",
            )
        max_new = asked
    if body.min_tokens > max_new:
        raise APIError(400, f"min_tokens ({body.min_tokens}) exceeds max tokens ({max_new})", param="min_tokens")
    sampling = _sampling(state, body, max_new)
    count_steering(state, steering)
    if adapter is not None:
        state.metrics.count_request(adapter.name)
    monitor = MonitorContext(return_scores=bool(body.monitor and body.monitor.return_scores),
                             snapshot=snapshot if snapshot else None, adapter=adapter.name if adapter else "",
                             steered_layers=frozenset(steering.prompt) if steering else frozenset())
    gen = GenerationRequest(
        prompt_ids=prompt_ids,
        sampling=sampling,
        steering=steering,
        timeout_s=settings.request_timeout_s,
        request_id=uuid.uuid4().hex,
        probes=snapshot.probes if snapshot else {},
        block_above=snapshot.block_above if snapshot else {},
        remediations=snapshot.remediations if snapshot else (),
        response_probes=snapshot.response_probes if snapshot else {},
        adapter=adapter,
    )
    return gen, monitor


class _Timing:
    """Per-request latency bookkeeping for the token histograms."""

    def __init__(self, state: ServerState, endpoint: str, adapter: str):
        self.state, self.endpoint, self.adapter = state, endpoint, adapter
        self.start = time.monotonic()
        self.first: float | None = None
        self.last: float | None = None

    def on_prefill(self, event: PrefillDone) -> None:
        self.state.metrics.observe_queue_wait(self.adapter, event.queue_wait_s)

    def on_token(self) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = now
            self.state.metrics.observe_ttft(self.endpoint, self.adapter, now - self.start)
        self.last = now

    def on_finish(self, done: Finished) -> None:
        m = self.state.metrics
        m.count_tokens(self.adapter, done.prompt_tokens, done.completion_tokens)
        if self.first is not None and done.completion_tokens > 1:
            m.observe_inter_token(self.endpoint, self.adapter, (self.last - self.first) / (done.completion_tokens - 1))


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class _ClientGone(Exception):
    pass


async def _cancel(*tasks: asyncio.Future) -> None:
    """Cancel ``tasks`` and wait until they have unwound (their streams are then closed)."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _until(task: asyncio.Future, http: Request):
    """Await ``task``, cancelling it if the client disconnects meanwhile (queued or running)."""
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if done:
            return task.result()
        if await http.is_disconnected():
            await _cancel(task)
            raise _ClientGone()


class RequestLifetime:
    """One API request's time on the engine, from submission to the release of all it holds.

    The only owner of the request's engine streams (one per choice, submitted together). It owns
    admission (:meth:`admit` waits for every prefill, so a full queue, a block or any other
    refusal is a real HTTP status), the answer (:meth:`collect` for JSON, :meth:`events` for
    SSE), the metrics of its tokens and finishes as they pass, and the end: whichever way the
    request ends (an answer, an error, the client leaving, the SSE consumer going away),
    :meth:`close` closes every stream, which cancels its rows in the engine, and the engine's
    next step gives back their KV cache slots, steering entries and places in the queue. A client
    that leaves while the lifetime waits gets the 499 ``client_closed_request`` error; one that
    leaves during SSE ends the response, and :meth:`events` closes the streams on its way out.

    Example::

        life = RequestLifetime(state, http, monitor, timing, streams)
        firsts = await life.admit()          # every prefill, or an APIError (streams closed)
        results = await life.collect()       # every choice to its end
    """

    def __init__(self, state: ServerState, http: Request, monitor: MonitorContext, timing: _Timing,
                 streams: list[AsyncIterator]):
        self.state, self.http, self.monitor, self.timing, self.streams = state, http, monitor, timing, streams

    async def admit(self) -> list[PrefillDone]:
        """Wait for every choice's prefill (its first event); their prefills share steps."""
        firsts = await self._gather([anext(stream) for stream in self.streams])
        for first in firsts:
            self.timing.on_prefill(first)
        return firsts

    async def collect(self) -> list[tuple[Finished, list[TokenOut]]]:
        """Every choice to its end: its final event and the tokens' log-probabilities."""
        results = await self._gather([self._collect(stream) for stream in self.streams])
        for done, _tokens in results:
            record_response_stop(self.state, self.monitor, done)
        return results

    async def events(self):
        """Yield (choice index, event) from every choice as they come; the first error ends all."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, stream: AsyncIterator) -> None:
            try:
                async for event in stream:
                    await queue.put((index, event))
            except Exception as exc:
                await queue.put((index, exc))
            finally:
                await queue.put((index, None))

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(self.streams)]
        try:
            live = len(self.streams)
            while live:
                index, event = await queue.get()
                if event is None:
                    live -= 1
                elif isinstance(event, Exception):
                    raise event
                else:
                    if isinstance(event, TokenDelta):
                        self.timing.on_token()
                    elif isinstance(event, Finished):
                        self.timing.on_finish(event)
                        record_response_stop(self.state, self.monitor, event)
                    yield index, event
        finally:
            await _cancel(*tasks)
            await self.close()

    async def close(self) -> None:
        """Close every stream (again is harmless): the engine cancels their rows."""
        for stream in self.streams:
            await stream.aclose()

    async def _gather(self, awaitables: list) -> list:
        """Await all of ``awaitables`` together; a client that leaves meanwhile or an error closes
        the request and raises its APIError."""
        tasks = [asyncio.ensure_future(a) for a in awaitables]
        try:
            return await _until(asyncio.gather(*tasks), self.http)
        except _ClientGone:
            await _cancel(*tasks)
            await self.close()
            raise APIError(499, "client disconnected", code="client_closed_request") from None
        except Exception as exc:
            await _cancel(*tasks)
            await self.close()
            raise as_api_error(exc) from exc

    async def _collect(self, events: AsyncIterator) -> tuple[Finished, list[TokenOut]]:
        tokens: list[TokenOut] = []
        try:
            async for event in events:
                if isinstance(event, TokenDelta):
                    self.timing.on_token()
                    tokens.extend(event.logprobs)
                elif isinstance(event, Finished):
                    self.timing.on_finish(event)
                    return event, tokens
        finally:
            await events.aclose()
        raise APIError(500, "generation ended without a result", type="server_error")


def _children(gen: GenerationRequest, n: int) -> list[GenerationRequest]:
    """``n`` engine requests for one API request; a seeded request's choice i uses seed + i. They
    form one prefill group: the engine reads their shared prompt once."""
    if n > 1:
        gen = replace(gen, prefill_group=gen.request_id)
    out = [gen]
    for i in range(1, n):
        seed = gen.sampling.seed
        out.append(replace(gen, request_id=f"{gen.request_id}-{i}",
                           sampling=replace(gen.sampling, seed=None if seed is None else (seed + i) % (MAX_SEED + 1))))
    return out


async def respond(
    state: ServerState,
    http: Request,
    body: _GenerationFields,
    gen: GenerationRequest,
    monitor: MonitorContext,
    renderer: Renderer,
    endpoint: str,
):
    """Run ``gen`` (``n`` times) on the engine and answer as JSON or as an SSE stream."""
    timing = _Timing(state, endpoint, monitor.adapter)
    tokenizer = state.lm.tokenizer
    children = _children(gen, body.n)
    watches = [ResponseWatch(monitor.snapshot) if monitor.snapshot and monitor.snapshot.watched else None
               for _ in children]
    monitor.watch = watches[0]
    life = RequestLifetime(state, http, monitor, timing,
                           [generate_text(state.engine, child, tokenizer, watch=w.update if w else None)
                            for child, w in zip(children, watches)])
    # Every prefill before answering, so queue-full, blocks and other refusals are real HTTP
    # statuses rather than errors inside a 200 stream (the engine reads the choices' prompt once).
    firsts = await life.admit()
    try:
        monitor.read(firsts[0])
    except Exception as exc:
        await life.close()
        raise as_api_error(exc) from exc
    record_readings(state, monitor)
    log = http.scope.setdefault("state", {}).setdefault("log", {})
    request_id = http.scope["state"].get("request_id") or gen.request_id
    log.update(prompt_tokens=len(gen.prompt_ids), steering=list(gen.steering.vectors) if gen.steering else [],
               monitor={r.vector: r.action for r in monitor.readings or ()})
    if state.settings.log_prompts:
        log["prompt"] = tokenizer.decode(gen.prompt_ids)
    if monitor.blocked():
        await life.close()
        raise APIError(
            400, "the request was blocked by the persona monitor: " + ", ".join(
                r.vector for r in monitor.readings if r.action == "block" and r.mode == "enforce"),
            type="content_filter", code="persona_blocked",
            extra={"persona_monitor": {"scores": {r.vector: r.public() for r in monitor.readings}}},
        )
    headers = {"X-Persona-Flagged": ",".join(monitor.flagged())} if monitor.flagged() else {}
    meta = {"id": f"{renderer.id_prefix}-{request_id}", "created": int(time.time()),
            "model": gen.adapter.name if gen.adapter is not None else state.lm.name}
    want_logprobs = gen.sampling.logprobs is not None
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _sse(life, meta, renderer, include_usage, log, tokenizer, want_logprobs, len(gen.prompt_ids)),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers},
        )
    results = await life.collect()
    completion = sum(done.completion_tokens for done, _tokens in results)
    log.update(completion_tokens=completion, finish_reason=results[0][0].finish_reason)
    choices = [renderer.final_choice(i, done.text, done.finish_reason,
                                     renderer.logprobs(tokens, tokenizer, 0) if want_logprobs else None)
               for i, (done, tokens) in enumerate(results)]
    body_out = {**meta, "object": renderer.object_final, "choices": choices,
                "usage": _usage(len(gen.prompt_ids), completion)}
    if (payload := monitor.payload()) is not None:
        body_out["persona_monitor"] = payload
    return JSONResponse(body_out, headers=headers)


def record_readings(state: ServerState, monitor: MonitorContext) -> None:
    m = state.metrics
    for r in monitor.readings or ():
        m.observe_score(r.vector, r.z if r.z is not None else r.score, monitor.adapter)
        m.count_decision(r.vector, r.action, r.mode, monitor.adapter)


def record_response_stop(state: ServerState, monitor: MonitorContext, done: Finished) -> None:
    if done.finish_reason == "content_filter" and monitor.watch is not None and monitor.watch.tripped:
        state.metrics.count_response_stop(monitor.watch.tripped, monitor.adapter)


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(life: RequestLifetime, meta: dict, renderer: Renderer, include_usage: bool, log: dict, tokenizer,
               want_logprobs: bool, prompt_tokens: int):
    chunk = {**meta, "object": renderer.object_chunk}
    first = [True] * len(life.streams)
    offsets = [0] * len(life.streams)
    completion = 0
    finished: list[Finished | None] = [None] * len(life.streams)
    try:
        async for i, event in life.events():
            if isinstance(event, TokenDelta):
                lp = renderer.logprobs(event.logprobs, tokenizer, offsets[i]) if want_logprobs else None
                offsets[i] += len(event.text)
                yield _data({**chunk, "choices": [renderer.chunk_choice(i, event.text, None, first[i], lp)]})
                first[i] = False
            elif isinstance(event, Finished):
                finished[i] = event
                completion += event.completion_tokens
                last = {**chunk, "choices": [renderer.chunk_choice(i, None if not first[i] else "", event.finish_reason,
                                                                   first[i], None)]}
                if all(f is not None for f in finished) and (payload := life.monitor.payload()) is not None:
                    last["persona_monitor"] = payload
                yield _data(last)
        log.update(completion_tokens=completion, finish_reason=finished[0].finish_reason if finished[0] else None)
        if include_usage:
            yield _data({**chunk, "choices": [], "usage": _usage(prompt_tokens, completion)})
    except Exception as exc:  # the status line is gone: report the error inside the stream
        err = as_api_error(exc)
        yield _data(envelope(err.message, err.type, err.param, err.code))
    yield "data: [DONE]\n\n"
