"""``/health`` (alive), ``/ready`` (model loaded, accepting work) and ``/metrics``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.auth import reads_thresholds
from app.deps import State

router = APIRouter()


@router.get("/health")
async def health():
    return {"status": "ok"}


@router.get("/ready")
async def ready(state: State):
    if not state.engine.alive:
        return JSONResponse({"status": "engine stopped"}, status_code=503)
    if not state.ready or state.engine.draining:
        return JSONResponse({"status": "draining" if state.engine.draining else "not ready"}, status_code=503)
    return {"status": "ready", "model": state.lm.name}


@router.get("/metrics")
async def metrics(state: State, request: Request):
    """Open to every scrape; the monitor thresholds only for callers that may read them."""
    body = generate_latest(state.metrics.registry)
    if reads_thresholds(request, state):
        body += generate_latest(state.metrics.ops_registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
