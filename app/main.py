"""The FastAPI application factory: wires settings, model, registry, engine and routers."""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from app import errors
from app.deps import ServerState
from app.jobs import JobStore
from app.metrics import Metrics
from app.middleware import BodyLimit, JsonByDefault, RequestObserver
from app.routes import (
    adapters,
    assess,
    chat,
    completions,
    files,
    fine_tuning,
    health,
    jobs,
    models,
    monitors,
    playground,
    screen,
    tokenize,
    vectors,
)
from app.sampling_defaults import resolve_sampling_defaults
from app.settings import Settings
from app.training import FineTuning
from steering.adapters import AdapterStore
from steering.engine import Engine, GenerationEngine
from steering.model import DEFAULT_MODEL, LoadedModel, ModelLoadError, load_model
from steering.monitor import MonitorSet
from steering.registry import VectorRegistry
from steering.store import SharedStore

log = logging.getLogger("persona_server")


def build_state(settings: Settings, lm: LoadedModel | None = None) -> ServerState:
    """Load (or reuse) the model, open the registry, start the engine."""
    if lm is None:
        lm = load_model(
            settings.model, dtype=settings.dtype, device=settings.device,
            cache_dir=settings.cache_dir, served_name=settings.served_model_name,
            # vLLM's engine loads the weights itself; this process needs the config and tokenizer.
            weights=settings.engine == "hf", prepack=settings.cpu_prepack, cpu_kernels=settings.cpu_kernels,
            quantization=settings.quantization,
        )
    store = SharedStore(settings.data_dir, poll_s=settings.store_poll_s)
    registry = VectorRegistry(
        settings.data_dir / "vectors", model_name=lm.name, fingerprint=lm.fingerprint,
        num_layers=lm.num_layers, hidden_size=lm.hidden_size, store=store,
    )
    seeded = registry.seed_from(settings.shipped_vectors_dir)
    if seeded:
        log.info("seeded vectors from %s: %s", settings.shipped_vectors_dir, ", ".join(seeded))
    monitor_set = MonitorSet(settings.data_dir / "monitors.json", registry, num_layers=lm.num_layers)
    adapter_store = open_adapters(settings, lm, store)
    engine = make_engine(settings, lm)
    metrics = Metrics()
    metrics.bind_engine(engine)
    metrics.model_info.info({"model": lm.name, "fingerprint": lm.fingerprint, "dtype": str(lm.dtype).removeprefix("torch.")})
    metrics.set_thresholds(monitor_set.configs())
    monitor_set.on_change(metrics.set_thresholds)  # also changes made by other replicas
    metrics.set_adapters(adapter_store.names())
    adapter_store.on_change(metrics.set_adapters)
    model_dir = getattr(lm.model, "name_or_path", None)
    defaults = resolve_sampling_defaults(settings, Path(model_dir) if model_dir else None,
                                         embedded=settings.model == DEFAULT_MODEL)
    log.info("sampling defaults: %s", defaults.describe())
    return ServerState(settings=settings, lm=lm, registry=registry, engine=engine, metrics=metrics,
                       monitors=monitor_set, sampling_defaults=defaults, jobs=JobStore.from_settings(settings),
                       adapters=adapter_store, created=int(time.time()))


def open_adapters(settings: Settings, lm: LoadedModel, shared: SharedStore) -> AdapterStore:
    """The adapters stored under the data directory, then ``lora_modules`` (each replaces a stored
    adapter of its name, so the flag always serves what its path holds now)."""
    store = AdapterStore(settings.data_dir / "adapters", lm, max_loras=settings.max_loras,
                         max_rank=settings.max_lora_rank, store=shared)
    stored = store.load_all()
    if stored:
        log.info("adapters from %s: %s", store.root, ", ".join(stored))
    for item in settings.lora_modules:
        name, _sep, path = item.partition("=")
        store.add(name, Path(path), replace=True)
        log.info("adapter %s from %s", name, path)
    return store


def make_engine(settings: Settings, lm: LoadedModel) -> GenerationEngine:
    """The engine ``settings.engine`` names, over ``lm`` (vLLM loads its own copy of the weights)."""
    if settings.engine == "vllm":
        from steering.vllm_engine import VLLMEngine

        model_dir = getattr(lm.model, "name_or_path", None)
        if not model_dir or not Path(model_dir, "config.json").exists():
            raise ModelLoadError(f"the vLLM engine needs a model directory; '{model_dir}' has no config.json")
        dtype = str(lm.dtype).removeprefix("torch.")
        return VLLMEngine(lm, model_dir=Path(model_dir), max_batch_size=settings.max_batch_size,
                          max_waiting=settings.max_waiting, max_model_len=settings.max_model_len,
                          max_num_batched_tokens=settings.max_num_batched_tokens, dtype=dtype,
                          tensor_parallel_size=settings.tensor_parallel_size, enforce_eager=True,
                          kv_cache_gib=settings.kv_cache_gib, gpu_memory_utilization=settings.gpu_memory_utilization,
                          adapter_dir=settings.data_dir / "adapters",
                          max_loras=settings.max_loras if settings.enable_lora or settings.lora_modules else 0,
                          max_lora_rank=settings.max_lora_rank)
    return Engine(lm, max_batch_size=settings.max_batch_size, max_waiting=settings.max_waiting,
                  max_model_len=settings.max_model_len, max_num_batched_tokens=settings.max_num_batched_tokens,
                  kv_cache_bytes=int(settings.kv_cache_gib * 2**30),
                  small_step_threads=settings.cpu_small_step_threads)


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
        app.state.adapters = state.adapters  # the fine-tuning runner's way in (steering.adapters.register_adapter)
        await state.engine.astart()
        app.state.fine_tuning = FineTuning(state, app.state)
        state.registry.store.watch()
        state.ready = True
        log.info("serving %s (%d layers, hidden %d) with %d vectors", state.lm.name, state.lm.num_layers,
                 state.lm.hidden_size, len(state.registry.names()))
        try:
            yield
        finally:
            state.ready = False
            state.registry.store.close()
            await app.state.fine_tuning.close()
            await state.jobs.close()
            state.engine.shutdown()

    app = FastAPI(title="persona-server", version="0.1.0", lifespan=lifespan)
    errors.install(app)
    for module in (chat, completions, models, adapters, tokenize, jobs, vectors, monitors, screen, assess, files,
                   fine_tuning, health, playground):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=playground.STATIC_DIR), name="static")
    app.add_middleware(JsonByDefault, exempt=(("PUT", "/v1/vectors/"), ("POST", "/v1/files"), ("PUT", "/v1/adapters/")))
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes,
                       exempt=(("PUT", "/v1/vectors/"), ("POST", "/v1/screen"), ("POST", "/v1/files"),
                               ("PUT", "/v1/adapters/")))
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(RequestObserver, fastapi_app=app)
    return app
