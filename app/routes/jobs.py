"""``POST /v1/vectors/extract`` (a job) and ``GET /v1/jobs/{id}``."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.auth import Admin, User
from app.deps import State
from app.errors import APIError
from app.routes.adapters import requested_adapter
from app.schemas import ExtractRequest
from steering.extract import TraitDefinition, build_vector, check_fits, definition_hash, extraction_choices
from steering.runner import EngineRunner

router = APIRouter()
_REQUIRED = {"texts": ("questions", "heldout_questions", "texts", "pairs"),
             "prompts": ("questions", "heldout_questions", "pairs"),
             "sentences": ("sentences", "heldout_questions", "pairs")}


def _definition(body: ExtractRequest, traits_dir: Path) -> tuple[TraitDefinition, str]:
    """The request's trait definition and the method to build it with."""
    if (body.trait is None) == (body.trait_name is None):
        raise APIError(400, "give exactly one of 'trait' (a definition) or 'trait_name' (a shipped one)", param="trait")
    if body.trait_name is not None:
        path = traits_dir / f"{body.trait_name}.json"
        if not path.is_file():
            raise APIError(404, f"no shipped trait '{body.trait_name}'", type="not_found_error", param="trait_name")
        data = json.loads(path.read_text())
    else:
        data = body.trait
    trait = TraitDefinition(
        name=body.name or data.get("name"), description=data.get("description"), pairs=data.get("pairs", []),
        questions=data.get("questions", []), heldout_questions=data.get("heldout_questions", []),
        texts=data.get("texts", []), sentences=data.get("sentences", {}), digest=definition_hash(data),
        extraction=data.get("extraction", {}),
    )
    method = extraction_choices(trait, body.method)["method"]  # the request's, else the definition's
    for key in ("name", "description") + _REQUIRED[method.split("_")[-1]]:
        if not data.get(key):
            raise APIError(400, f"the trait definition needs a non-empty '{key}' for {method}", param=f"trait.{key}")
    return trait, method


@router.post("/v1/vectors/extract", status_code=202)
async def extract(body: ExtractRequest, state: State, who: Admin):
    state.require_engine_feature("extraction")
    adapter = requested_adapter(state, body.model)
    trait, method = _definition(body, state.settings.traits_dir)
    neutral = json.loads(state.settings.neutral_prompts_file.read_text())["prompts"]
    # Refused here, before the job exists, rather than as a failed job.
    check_fits(state.lm.tokenizer, trait, state.prompt_limit, method=method, neutral_prompts=neutral, sweep=body.sweep)
    layer = extraction_choices(trait, body.method, state.lm.name)["layer"]
    if layer is not None and layer > state.lm.num_layers:
        raise APIError(400, f"layer {layer} is past the model's {state.lm.num_layers} layers", param="trait.extraction.layer")

    async def work(job) -> dict:
        def tick(n: int) -> None:
            job.progress += n

        vector = await build_vector(EngineRunner(state.engine, progress=tick, adapter=adapter), state.lm, trait,
                                    neutral_prompts=neutral, method=body.method, sweep=body.sweep,
                                    limit=state.prompt_limit)
        if adapter is not None:  # directions and statistics read through the adapter
            vector.source["adapter"] = adapter.name
        state.registry.put(vector)
        return {"vector": vector.name, "recommended_layer": vector.recommended_layer,
                "coefficient_range": vector.coefficient_range, "heldout_auroc": vector.extra["heldout_auroc"]}

    job = state.jobs.submit("extract", work, owner=who)
    return JSONResponse(job.view(), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})


@router.get("/v1/jobs/{job_id}")
async def get_job(job_id: str, state: State, _user: User):
    job = state.jobs.get(job_id)
    if job is None:
        raise APIError(404, f"job '{job_id}' not found", type="not_found_error", code="job_not_found")
    return job.view()
