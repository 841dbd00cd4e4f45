"""``/health`` (alive), ``/ready`` (model loaded, accepting work) and ``/metrics``."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

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
async def metrics(state: State):
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
