"""From a validated OpenAI request to engine events and back to an OpenAI response.

Shared by ``/v1/chat/completions`` and ``/v1/completions``; each supplies a
:class:`Renderer` for its response shapes."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from app.deps import ServerState
from app.errors import APIError, as_api_error, envelope
from app.schemas import SteeringField, _GenerationFields
from app.steering_policy import admit_steering
from steering.engine import Finished, GenerationRequest, PrefillDone, TokenDelta
from steering.monitor import Reading, ResponseWatch
from steering.sampling import SamplingParams
from steering.steer import RowSteering


@dataclass
class Renderer:
    """Response shapes of one endpoint."""

    object_final: str
    object_chunk: str
    id_prefix: str
    final_choice: Callable[[str, str], dict]  # (text, finish_reason) -> choice
    chunk_choice: Callable[[str | None, str | None, bool], dict]  # (text, finish, first) -> choice


def check_model(state: ServerState, name: str) -> None:
    if name not in (state.lm.name, "default"):
        raise APIError(
            404, f"model '{name}' is not served here; use '{state.lm.name}'", type="not_found_error",
            param="model", code="model_not_found",
        )


@dataclass
class MonitorContext:
    """What the monitors saw for one request; filled in by the engine's worker."""

    return_scores: bool
    readings: list[Reading] | None = None
    watch: ResponseWatch | None = None

    def flagged(self) -> list[str]:
        return [r.vector for r in self.readings or () if r.action != "allow"]

    def blocked(self) -> bool:
        return any(r.action == "block" and r.mode == "enforce" for r in self.readings or ())

    def payload(self) -> dict | None:
        """The ``persona_monitor`` field, when the request was flagged or asked for scores."""
        tripped = self.watch is not None and self.watch.tripped is not None
        if not self.readings or not (self.return_scores or self.flagged() or tripped):
            return None
        out = {
            "read_at": "last prompt token, residual stream before this request's steering at the monitored layer",
            "scores": {r.vector: r.public() for r in self.readings},
        }
        if self.watch is not None and self.watch.count:
            out["response_means"] = self.watch.means()
            if self.watch.tripped:
                out["stopped_by"] = self.watch.tripped
        return out


def resolve_request_steering(state: ServerState, field: SteeringField) -> RowSteering | None:
    """A request's ``steering`` field admitted by the server's steering policy and resolved to
    per-layer deltas. Every route that takes ``steering`` goes through here."""
    return admit_steering(field, state.registry, state.monitors, state.settings)


def count_steering(state: ServerState, steering: RowSteering | None) -> None:
    """Count an accepted request's steering use by vector."""
    for name in steering.vectors if steering else ():
        state.metrics.steering.labels(vector=name).inc()


def build_request(state: ServerState, body: _GenerationFields, prompt_ids: list[int], prompt_param: str) -> tuple[GenerationRequest, MonitorContext]:
    """Apply the checks that need the model and registry; return what the engine runs."""
    settings, lm = state.settings, state.lm
    check_model(state, body.model)
    steering = resolve_request_steering(state, body.steering)

    n_prompt = len(prompt_ids)
    if n_prompt == 0:
        raise APIError(400, "the prompt is empty", param=prompt_param)
    if settings.max_prompt_tokens is not None and n_prompt > settings.max_prompt_tokens:
        raise APIError(400, f"the prompt has {n_prompt} tokens; this server accepts at most {settings.max_prompt_tokens}",
                       param=prompt_param, code="prompt_too_long")
    room = lm.context_length - n_prompt
    if room < 1:
        raise APIError(
            400,
            f"the prompt has {n_prompt} tokens; the model's context is {lm.context_length} tokens "
            "and at least one must remain for the answer",
            param=prompt_param, code="context_length_exceeded",
        )
    asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
    field = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
    if asked is None:
        max_new = min(settings.default_max_tokens, room)
    else:
        if asked > settings.max_tokens_limit:
            raise APIError(400, f"{field} must be at most {settings.max_tokens_limit}", param=field)
        if asked > room:
            raise APIError(
                400,
                f"{field} is {asked}, but the prompt has {n_prompt} tokens and the context is "
                f"{lm.context_length}: at most {room} tokens can be generated",
                param=field, code="context_length_exceeded",
            )
        max_new = asked
    if body.min_tokens > max_new:
        raise APIError(400, f"min_tokens ({body.min_tokens}) exceeds max tokens ({max_new})", param="min_tokens")
    sampling = SamplingParams(
        max_new_tokens=max_new,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        stop=tuple(body.stop or ()),
        min_tokens=body.min_tokens,
        ignore_eos=body.ignore_eos,
    )
    count_steering(state, steering)
    monitor = MonitorContext(return_scores=bool(body.monitor and body.monitor.return_scores))
    monitors = state.monitors
    steered_layers = frozenset(steering.prompt) if steering else frozenset()

    def prefill_check(states):
        monitor.readings = monitors.score(states, steered_layers)
        return monitor.readings if monitor.blocked() else None

    watched = [c.vector for c in monitors.active() if c.response_threshold is not None]
    if watched:
        monitor.watch = ResponseWatch(monitors, watched)
    gen = GenerationRequest(
        prompt_ids=prompt_ids,
        sampling=sampling,
        steering=steering,
        timeout_s=settings.request_timeout_s,
        request_id=uuid.uuid4().hex,
        capture_layers=monitors.layers(),
        prefill_check=prefill_check if monitors.active() else None,
        response_layers=monitors.response_layers() if watched else frozenset(),
        response_check=monitor.watch.update if watched else None,
    )
    return gen, monitor


class _Timing:
    """Per-request latency bookkeeping for the token histograms."""

    def __init__(self, state: ServerState, endpoint: str):
        self.state, self.endpoint = state, endpoint
        self.start = time.monotonic()
        self.first: float | None = None
        self.last: float | None = None

    def on_prefill(self, event: PrefillDone) -> None:
        self.state.metrics.queue_wait.observe(event.queue_wait_s)

    def on_token(self) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = now
            self.state.metrics.ttft.labels(self.endpoint).observe(now - self.start)
        self.last = now

    def on_finish(self, done: Finished) -> None:
        m = self.state.metrics
        m.prompt_tokens.inc(done.prompt_tokens)
        m.generation_tokens.inc(done.completion_tokens)
        if self.first is not None and done.completion_tokens > 1:
            m.inter_token.labels(self.endpoint).observe((self.last - self.first) / (done.completion_tokens - 1))


def _usage(done: Finished) -> dict:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


async def respond(
    state: ServerState,
    http: Request,
    body: _GenerationFields,
    gen: GenerationRequest,
    monitor: MonitorContext,
    renderer: Renderer,
    endpoint: str,
):
    """Run ``gen`` on the engine and answer as JSON or as an SSE stream."""
    timing = _Timing(state, endpoint)
    events = state.engine.generate(gen)
    # Wait for the prefill before answering, so queue-full and other refusals are real
    # HTTP statuses rather than errors inside a 200 stream.
    try:
        first = await anext(events)
    except Exception as exc:
        await events.aclose()
        raise as_api_error(exc) from exc
    timing.on_prefill(first)
    record_readings(state, monitor)
    log = http.scope.setdefault("state", {}).setdefault("log", {})
    log.update(prompt_tokens=len(gen.prompt_ids), steering=list(gen.steering.vectors) if gen.steering else [],
               monitor={r.vector: r.action for r in monitor.readings or ()})
    if state.settings.log_prompts:
        log["prompt"] = state.lm.tokenizer.decode(gen.prompt_ids)
    if first.blocked is not None:
        await events.aclose()
        raise APIError(
            400, "the request was blocked by the persona monitor: " + ", ".join(
                r.vector for r in monitor.readings if r.action == "block" and r.mode == "enforce"),
            type="content_filter", code="persona_blocked",
            extra={"persona_monitor": {"scores": {r.vector: r.public() for r in monitor.readings}}},
        )
    headers = {"X-Persona-Flagged": ",".join(monitor.flagged())} if monitor.flagged() else {}
    meta = {"id": f"{renderer.id_prefix}-{gen.request_id}", "created": int(time.time()), "model": state.lm.name}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _sse(events, meta, renderer, timing, include_usage, monitor, state, log),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers},
        )
    collector = asyncio.ensure_future(_collect(events, timing))
    try:
        while True:
            done, _ = await asyncio.wait({collector}, timeout=0.5)
            if done:
                break
            if await http.is_disconnected():
                collector.cancel()
                raise APIError(499, "client disconnected", code="client_closed_request")
        result = collector.result()
    except Exception as exc:
        collector.cancel()
        raise as_api_error(exc) from exc
    record_response_stop(state, monitor, result)
    log.update(completion_tokens=result.completion_tokens, finish_reason=result.finish_reason)
    body_out = {
        **meta,
        "object": renderer.object_final,
        "choices": [renderer.final_choice(result.text, result.finish_reason)],
        "usage": _usage(result),
    }
    if (payload := monitor.payload()) is not None:
        body_out["persona_monitor"] = payload
    return JSONResponse(body_out, headers=headers)


def record_readings(state: ServerState, monitor: MonitorContext) -> None:
    m = state.metrics
    for r in monitor.readings or ():
        value = r.z if r.z is not None else r.score
        m.monitor_score.labels(r.vector).observe(value)
        m.monitor_zscore.labels(r.vector).observe(value)
        m.monitor_decisions.labels(r.vector, r.action, r.mode).inc()


def record_response_stop(state: ServerState, monitor: MonitorContext, done: Finished) -> None:
    if done.finish_reason == "content_filter" and monitor.watch is not None and monitor.watch.tripped:
        state.metrics.response_stops.labels(monitor.watch.tripped).inc()


async def _collect(events: AsyncIterator, timing: _Timing) -> Finished:
    try:
        async for event in events:
            if isinstance(event, TokenDelta):
                timing.on_token()
            elif isinstance(event, Finished):
                timing.on_finish(event)
                return event
    finally:
        await events.aclose()
    raise APIError(500, "generation ended without a result", type="server_error")


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(events: AsyncIterator, meta: dict, renderer: Renderer, timing: _Timing, include_usage: bool,
               monitor: MonitorContext, state: ServerState, log: dict):
    chunk = {**meta, "object": renderer.object_chunk}
    first = True
    try:
        async for event in events:
            if isinstance(event, TokenDelta):
                timing.on_token()
                yield _data({**chunk, "choices": [renderer.chunk_choice(event.text, None, first)]})
                first = False
            elif isinstance(event, Finished):
                timing.on_finish(event)
                record_response_stop(state, monitor, event)
                log.update(completion_tokens=event.completion_tokens, finish_reason=event.finish_reason)
                last = {**chunk, "choices": [renderer.chunk_choice(None if not first else "", event.finish_reason, first)]}
                if (payload := monitor.payload()) is not None:
                    last["persona_monitor"] = payload
                yield _data(last)
                if include_usage:
                    yield _data({**chunk, "choices": [], "usage": _usage(event)})
                break
    except Exception as exc:  # the status line is gone: report the error inside the stream
        err = as_api_error(exc)
        yield _data(envelope(err.message, err.type, err.param, err.code))
    finally:
        await events.aclose()
    yield "data: [DONE]\n\n"
