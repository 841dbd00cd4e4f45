"""``POST /v1/screen``: projection-difference screening of a JSONL training set, as a job.

The upload is streamed to a spool file (never held in memory) and size-limited; the job
then reads it line by line. ``GET /v1/jobs/{id}`` gives the per-vector summary and top
samples, ``GET /v1/jobs/{id}/output`` the per-sample rows as JSONL. Spool and output belong
to the job and are deleted with it (see :mod:`app.jobs`)."""

from __future__ import annotations

import json
import os

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse

from app.auth import User
from app.deps import State
from app.errors import APIError
from app.jobs import partial
from app.routes.adapters import requested_adapter
from steering.atomic import fsync_dir
from steering.runner import EngineRunner
from steering.screen import Screener, ScreenReport, jsonl_lines

router = APIRouter()


@router.post(
    "/v1/screen",
    status_code=202,
    openapi_extra={"requestBody": {"content": {"application/x-ndjson": {"schema": {"type": "string"}}}}},
)
async def screen(http: Request, state: State, who: User, vectors: str, top: int = 50, generate: bool = True,
                 max_new_tokens: int = 64, model: str | None = None):
    """Body: JSONL, one ``{"messages": [...]}`` or ``{"prompt", "response"}`` per line.
    Query: ``vectors=evil,sycophantic``, ``top``, ``generate`` (false: cheap variant only),
    ``model`` (a loaded LoRA adapter to screen against: its states and its natural answers)."""
    adapter = requested_adapter(state, model)
    names = [n for n in vectors.split(",") if n]
    if not names:
        raise APIError(400, "give at least one vector", param="vectors")
    if not 1 <= top <= 10_000:
        raise APIError(400, "top must be in 1..10000", param="top")
    if not 1 <= max_new_tokens <= state.settings.max_tokens_limit:
        raise APIError(400, f"max_new_tokens must be in 1..{state.settings.max_tokens_limit}", param="max_new_tokens")
    resolved = []
    for name in names:
        try:
            resolved.append(state.registry.get(name))
        except KeyError:
            raise APIError(404, f"vector '{name}' not found", type="not_found_error", param="vectors",
                           code="vector_not_found") from None
    state.jobs.check_room(who)  # before reading a large upload that would be refused anyway
    limit = state.settings.max_screen_bytes
    source = state.jobs.new_file(".jsonl")
    size = 0
    try:
        with open(source, "wb") as spool:
            async for chunk in http.stream():
                size += len(chunk)
                if size > limit:
                    raise APIError(413, f"the dataset is larger than {limit} bytes", code="payload_too_large")
                spool.write(chunk)
        if size == 0:
            raise APIError(400, "the request body (a JSONL dataset) is empty", param="body")
    except BaseException:
        source.unlink(missing_ok=True)
        raise

    async def work(job) -> dict:
        report = ScreenReport(names, top)
        screener = Screener(EngineRunner(state.engine, adapter=adapter), state.lm.tokenizer, resolved,
                            generate=generate, max_new_tokens=max_new_tokens, limit=state.prompt_limit)
        try:
            with open(partial(job.output), "w", encoding="utf-8") as out:
                async for row in screener.rows(jsonl_lines(source), report):
                    out.write(json.dumps(row) + "\n")
                    job.progress += 1
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial(job.output), job.output)
            fsync_dir(job.output.parent)
        finally:
            source.unlink(missing_ok=True)
        return {"model": adapter.name if adapter is not None else state.lm.name, **report.summary(generate),
                "output": f"/v1/jobs/{job.id}/output"}

    try:
        job = state.jobs.submit("screen", work, owner=who, output_suffix=".out.jsonl", files=(source,))
    except BaseException:
        source.unlink(missing_ok=True)
        raise
    return JSONResponse(job.view(), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})


@router.get("/v1/jobs/{job_id}/output")
async def job_output(job_id: str, state: State, _user: User):
    job = state.jobs.get(job_id)
    if job is None or job.output is None or job.status != "succeeded" or not job.output.exists():
        raise APIError(404, f"no finished output for job '{job_id}'", type="not_found_error", code="job_output_not_found")
    return FileResponse(job.output, media_type="application/x-ndjson")
