"""Fine-tuning jobs in OpenAI's shapes: ``POST /v1/fine_tuning/jobs``, ``GET .../jobs[/{id}]``,
``GET .../{id}/events``, ``POST .../{id}/cancel``; the additive field ``persona`` asks for
preventative steering during training and for the persona shifts to report.

Every input is checked here, before the job exists: the files, the model, the vectors and
layers of ``persona``, and every training row's length in tokens (a row that does not fit is a
400 naming its line)."""

from __future__ import annotations

import asyncio
import copy
from typing import Annotated, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from app.auth import Admin, User
from app.deps import State
from app.errors import APIError
from app.routes.files import FT
from app.training import build_spec
from steering.finetune import Hyperparameters, MonitorSpec, PreventiveEntry, TrainingFileError, read_chat_file
from steering.registry import VectorNotFoundError

router = APIRouter()
Auto = Literal["auto"]


class HyperparametersIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # The bounds sit on the number alone: on the union they would be applied to "auto" too.
    n_epochs: Annotated[int, Field(ge=1, le=50)] | Auto = "auto"
    batch_size: Annotated[int, Field(ge=1, le=256)] | Auto = "auto"
    learning_rate_multiplier: Annotated[float, Field(gt=0, le=100)] | Auto = "auto"


class PreventiveIn(BaseModel):
    """Like a request's steering entry; the raw vector at every token is what the method adds."""

    model_config = ConfigDict(extra="forbid")
    vector: str
    coefficient: float
    layers: list[int] | Literal["all"] | None = None


class MonitorIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vector: str
    layer: int | None = None


class PersonaIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    preventative_steering: list[PreventiveIn] = Field(default_factory=list, max_length=16)
    monitor: list[str | MonitorIn] = Field(default_factory=list, max_length=16)


class MethodIn(BaseModel):
    """OpenAI's newer ``method`` object; only supervised fine-tuning is offered."""

    type: Literal["supervised"] = "supervised"
    supervised: dict | None = None


class FineTuningJobIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: HyperparametersIn | None = None
    method: MethodIn | None = None
    suffix: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    integrations: list[dict] | None = None
    persona: PersonaIn | None = None


def _hyperparameters(body: FineTuningJobIn) -> Hyperparameters:
    given = body.hyperparameters
    if given is None and body.method is not None and body.method.supervised:
        try:
            given = HyperparametersIn(**(body.method.supervised.get("hyperparameters") or {}))
        except ValueError as exc:
            raise APIError(400, f"method.supervised.hyperparameters: {exc.errors()[0]['msg']}",
                           param="method.supervised.hyperparameters") from None
    given = given or HyperparametersIn()
    # "auto": the paper's one epoch; a batch of 4 and the base learning rate.
    pick = lambda value, auto: auto if value == "auto" else value  # noqa: E731
    return Hyperparameters(n_epochs=pick(given.n_epochs, 1), batch_size=pick(given.batch_size, 4),
                           learning_rate_multiplier=float(pick(given.learning_rate_multiplier, 1.0)),
                           seed=body.seed if body.seed is not None else 0)


def _file_path(ft, file_id: str, param: str):
    obj = ft.files.get(file_id)
    if obj is None or obj["purpose"] != "fine-tune":
        raise APIError(404, f"no fine-tune file '{file_id}'; upload it with POST /v1/files", type="not_found_error",
                       param=param, code="file_not_found")
    return ft.files.path(file_id)


def _vector(state, name: str, param: str):
    try:
        return state.registry.get(name)
    except (KeyError, VectorNotFoundError):
        raise APIError(404, f"vector '{name}' not found", type="not_found_error", param=param,
                       code="vector_not_found") from None


@router.post("/v1/fine_tuning/jobs")
async def create_job(body: FineTuningJobIn, state: State, ft: FT, _who: Admin):
    if body.model not in {state.lm.name, "default", state.settings.served_model_name}:
        raise APIError(404, f"model '{body.model}' is not served here; fine-tune the base model '{state.lm.name}'",
                       type="not_found_error", param="model", code="model_not_found")
    hp = _hyperparameters(body)
    train_path = _file_path(ft, body.training_file, "training_file")
    valid_path = _file_path(ft, body.validation_file, "validation_file") if body.validation_file else None
    persona = body.persona or PersonaIn()
    num_layers, limit = state.lm.num_layers, state.settings.max_abs_coefficient
    vectors = {}
    preventative = []
    for i, entry in enumerate(persona.preventative_steering):
        vectors[entry.vector] = vector = _vector(state, entry.vector, f"persona.preventative_steering[{i}].vector")
        if abs(entry.coefficient) > limit:
            raise APIError(400, f"|coefficient| must be at most {limit:g}", param=f"persona.preventative_steering[{i}].coefficient")
        if isinstance(entry.layers, list) and (not entry.layers or any(not 1 <= x <= num_layers for x in entry.layers)):
            raise APIError(400, f"layers are 1..{num_layers} (block outputs), or \"all\"",
                           param=f"persona.preventative_steering[{i}].layers")
        if entry.layers is None and vector.recommended_layer is None:
            raise APIError(400, f"vector '{entry.vector}' has no recommended layer; give 'layers'",
                           param=f"persona.preventative_steering[{i}].layers")
        preventative.append(PreventiveEntry(entry.vector, entry.coefficient, entry.layers))
    monitor = []
    for i, item in enumerate(persona.monitor):
        item = MonitorIn(vector=item) if isinstance(item, str) else item
        vectors[item.vector] = vector = _vector(state, item.vector, f"persona.monitor[{i}].vector")
        layer = item.layer or vector.recommended_layer
        if layer is None or not 1 <= layer <= num_layers:
            raise APIError(400, f"give a layer in 1..{num_layers} for '{item.vector}'", param=f"persona.monitor[{i}].layer")
        monitor.append(MonitorSpec(item.vector, layer))
    max_tokens = min(state.settings.finetune_max_tokens, state.lm.context_length)
    # A copy: the serving side uses its tokenizer from other threads, and this reads in one of its own.
    tokenizer = copy.deepcopy(state.lm.tokenizer)
    for path, param in ((train_path, "training_file"), (valid_path, "validation_file")):
        if path is None:
            continue
        try:
            await asyncio.to_thread(read_chat_file, path, tokenizer, max_tokens=max_tokens)
        except TrainingFileError as exc:
            raise APIError(400, f"{param}: {exc}", param=param, code="invalid_training_file", extra={"line": exc.line}) from None
    spec = build_spec(state.settings, train_path, valid_path, hp, preventative, monitor, max_tokens)
    return ft.create(spec, model=body.model, training_file=body.training_file, validation_file=body.validation_file,
                     suffix=body.suffix, persona=persona.model_dump(), monitor_vectors=list(vectors.values()))


def _job(ft, job_id: str) -> dict:
    job = ft.get(job_id)
    if job is None:
        raise APIError(404, f"fine-tuning job '{job_id}' not found", type="not_found_error", param="fine_tuning_job_id",
                       code="job_not_found")
    return job


def _page(items: list[dict], after: str | None, limit: int) -> dict:
    if not 1 <= limit <= 1000:
        raise APIError(400, "limit must be in 1..1000", param="limit")
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit}


@router.get("/v1/fine_tuning/jobs")
async def list_jobs(ft: FT, _user: User, after: str | None = None, limit: int = 20):
    return _page(ft.list(), after, limit)


@router.get("/v1/fine_tuning/jobs/{fine_tuning_job_id}")
async def get_job(fine_tuning_job_id: str, ft: FT, _user: User):
    return _job(ft, fine_tuning_job_id)


@router.get("/v1/fine_tuning/jobs/{fine_tuning_job_id}/events")
async def job_events(fine_tuning_job_id: str, ft: FT, _user: User, after: str | None = None, limit: int = 20):
    _job(ft, fine_tuning_job_id)
    return _page(ft.events(fine_tuning_job_id), after, limit)


@router.post("/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel")
async def cancel_job(fine_tuning_job_id: str, ft: FT, _who: Admin):
    job = _job(ft, fine_tuning_job_id)
    if job["status"] not in ("validating_files", "queued", "running"):
        raise APIError(409, f"the job has already {job['status']}", param="fine_tuning_job_id", code="job_finished")
    ft.cancel(fine_tuning_job_id)
    # Answered once the training process has stopped (it is killed if it does not within seconds).
    return await ft.wait(fine_tuning_job_id)
