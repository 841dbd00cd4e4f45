"""The FastAPI application factory: wires settings, model, registry, engine and routers."""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import errors
from app.deps import ServerState
from app.metrics import Metrics
from app.routes import chat, completions, health, jobs, models, monitors, vectors
from app.settings import Settings
from steering.engine import Engine
from steering.model import LoadedModel, load_model
from steering.monitor import MonitorSet
from steering.registry import VectorRegistry

log = logging.getLogger("persona_server")


def build_state(settings: Settings, lm: LoadedModel | None = None) -> ServerState:
    """Load (or reuse) the model, open the registry, start the engine."""
    if lm is None:
        lm = load_model(
            settings.model, dtype=settings.dtype, device=settings.device,
            cache_dir=settings.cache_dir, served_name=settings.served_model_name,
        )
    registry = VectorRegistry(
        settings.data_dir / "vectors", model_name=lm.name, fingerprint=lm.fingerprint,
        num_layers=lm.num_layers, hidden_size=lm.hidden_size,
    )
    seeded = registry.seed_from(settings.shipped_vectors_dir)
    if seeded:
        log.info("seeded vectors from %s: %s", settings.shipped_vectors_dir, ", ".join(seeded))
    monitor_set = MonitorSet(settings.data_dir / "monitors.json", registry, num_layers=lm.num_layers)
    engine = Engine(lm, max_batch_size=settings.max_batch_size, max_waiting=settings.max_waiting)
    metrics = Metrics()
    metrics.bind_engine(engine)
    metrics.model_info.info({"model": lm.name, "fingerprint": lm.fingerprint, "dtype": str(lm.dtype).removeprefix("torch.")})
    metrics.set_thresholds(monitor_set.configs())
    return ServerState(settings=settings, lm=lm, registry=registry, engine=engine, metrics=metrics,
                       monitors=monitor_set, created=int(time.time()))


class _RequestMetrics:
    """ASGI middleware: count and time every HTTP request by its route template."""

    def __init__(self, app, fastapi_app: FastAPI):
        self.app, self.fastapi_app = app, fastapi_app

    @staticmethod
    def _endpoint(scope) -> str:
        # The router records the matched route in the scope; unmatched paths share one label.
        route = scope.get("route")
        return getattr(route, "path", None) or "other"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.monotonic(), {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            server = getattr(self.fastapi_app.state, "server", None)
            if server is not None:
                endpoint = self._endpoint(scope)
                server.metrics.requests.labels(endpoint, str(status["code"])).inc()
                server.metrics.request_duration.labels(endpoint).observe(time.monotonic() - start)


class _JsonByDefault:
    """ASGI middleware: read POST bodies as JSON when the client sent no JSON content type.

    ``curl -d '{...}'`` labels its body ``application/x-www-form-urlencoded``; every POST route
    here takes JSON, so a missing or form content type is treated as JSON.
    """

    _FORM = b"application/x-www-form-urlencoded"

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            current = dict(scope["headers"]).get(b"content-type")
            if current is None or current.split(b";")[0].strip() == self._FORM:
                # In place: the metrics middleware outside reads the routed scope afterwards.
                scope["headers"] = headers + [(b"content-type", b"application/json")]
        return await self.app(scope, receive, send)


def create_app(settings: Settings | None = None, *, lm: LoadedModel | None = None) -> FastAPI:
    """Build the app. Pass ``lm`` to serve an already loaded model (tests share one).

    Example::

        app = create_app(Settings(data_dir=Path("/tmp/persona")))
        uvicorn.run(app, host="127.0.0.1", port=8000)
    """
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = build_state(settings, lm)
        app.state.server = state
        state.engine.start()
        state.ready = True
        log.info("serving %s (%d layers, hidden %d) with %d vectors", state.lm.name, state.lm.num_layers,
                 state.lm.hidden_size, len(state.registry.names()))
        try:
            yield
        finally:
            state.ready = False
            state.jobs.cancel_all()
            state.engine.shutdown()

    app = FastAPI(title="persona-server", version="0.1.0", lifespan=lifespan)
    errors.install(app)
    for module in (chat, completions, models, jobs, vectors, monitors, health):
        app.include_router(module.router)
    app.add_middleware(_JsonByDefault)
    app.add_middleware(_RequestMetrics, fastapi_app=app)
    return app
