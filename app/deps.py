"""The server's state objects, injected into routes as dependencies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from app.jobs import JobStore
from app.metrics import Metrics
from app.sampling_defaults import SamplingDefaults
from app.settings import Settings
from steering.adapters import AdapterStore
from steering.engine import GenerationEngine, UnsupportedOnEngineError
from steering.limits import PromptLimit
from steering.model import LoadedModel
from steering.monitor import MonitorSet
from steering.registry import VectorRegistry


@dataclass
class ServerState:
    settings: Settings
    lm: LoadedModel
    registry: VectorRegistry
    engine: GenerationEngine
    metrics: Metrics
    monitors: MonitorSet
    sampling_defaults: SamplingDefaults
    jobs: JobStore
    adapters: AdapterStore
    ready: bool = False
    created: int = 0

    @property
    def prompt_limit(self) -> PromptLimit:
        """How long a sequence work beside chat may hand to the engine."""
        return PromptLimit(self.engine.max_model_len, self.settings.max_prompt_tokens)

    def require_engine_feature(self, feature: str) -> None:
        """Refuse, before any work starts, what the running engine cannot do (501)."""
        if feature in self.engine.unsupported:
            raise UnsupportedOnEngineError(f"{feature} is not available on the {self.engine.name} engine")


def get_state(request: Request) -> ServerState:
    return request.app.state.server


State = Annotated[ServerState, Depends(get_state)]
