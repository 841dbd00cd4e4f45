"""``POST /v1/assess``: personality inventories under optional steering, of the base model or
of a loaded LoRA adapter (``model``)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.auth import User
from app.deps import State
from app.errors import APIError
from app.generation import count_steering, resolve_request_steering
from app.routes.adapters import requested_adapter
from app.schemas import AssessRequest, steering_entries
from steering.assess import Inventory, assess

router = APIRouter()


def shifts(base: dict, steered: dict) -> dict:
    """Per-dimension change: pole shares (MBTI) or factor scores (Big Five)."""
    if "dimensions" in base:
        return {dim: round(steered["dimensions"][dim]["share"][dim.split("-")[0]] - v["share"][dim.split("-")[0]], 4)
                for dim, v in base["dimensions"].items()}
    return {f: round(steered["factors"][f]["score"] - v["score"], 4) for f, v in base["factors"].items()}


@router.post("/v1/assess")
async def assess_route(body: AssessRequest, state: State, who: User):
    state.require_engine_feature("assessment")
    adapter = requested_adapter(state, body.model)
    entries = steering_entries(body.steering)
    steering = resolve_request_steering(state, body.steering)
    if body.compare and steering is None:
        raise APIError(400, "compare needs a steering to compare with", param="compare")
    inventory = Inventory.load(state.settings.inventories_dir / f"{body.inventory}.json")
    prompts = len(inventory.items) * body.repetitions * (2 if body.compare else 1)
    if prompts > state.settings.max_assess_prompts:
        raise APIError(400, f"this assessment needs {prompts} prompts; the server allows {state.settings.max_assess_prompts}",
                       param="repetitions")
    count_steering(state, steering)
    model = adapter.name if adapter is not None else state.lm.name

    async def run(job=None) -> dict:
        def tick(n: int) -> None:
            if job is not None:
                job.progress += n

        steered = await assess(state.engine, inventory, repetitions=body.repetitions, steering=steering,
                               seed=body.seed, progress=tick, limit=state.prompt_limit, adapter=adapter)
        if not body.compare:
            return {"object": "assessment", "model": model, "steering": [e.model_dump() for e in entries], **steered}
        base = await assess(state.engine, inventory, repetitions=body.repetitions, seed=body.seed, progress=tick,
                            limit=state.prompt_limit, adapter=adapter)
        return {"object": "assessment.comparison", "model": model, "steering": [e.model_dump() for e in entries],
                "unsteered": base, "steered": steered, "shift": shifts(base, steered)}

    if body.background:
        job = state.jobs.submit("assess", run, owner=who, total=prompts)
        return JSONResponse(job.view(), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})
    return await state.jobs.run_inline(who, run)
