"""``/v1/monitors``: per-vector monitors (admin), their remediations, and threshold calibration on
benign prompts."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Header
from fastapi.responses import JSONResponse

from app.auth import Admin
from app.deps import ServerState, State
from app.errors import APIError
from app.schemas import CalibrateRequest, MonitorPut
from steering.chat import chat_prompt_ids
from steering.engine import UnsupportedOnEngineError
from steering.monitor import (
    MonitorConfig,
    calibrate_thresholds,
    config_etag,
    percentiles,
    remediation_terms,
    scalar_projection,
    z_score,
)
from steering.runner import EngineRunner
from steering.store import check_precondition

router = APIRouter()


def _view(cfg: MonitorConfig) -> dict:
    return {"object": "monitor", **asdict(cfg)}


IfMatch = Annotated[str | None, Header(description="write only if the monitor has this ETag (412 otherwise)")]
IfNoneMatch = Annotated[str | None, Header(description="'*': create only, 412 if a monitor exists")]


def _tagged(cfg: MonitorConfig) -> JSONResponse:
    return JSONResponse(_view(cfg), headers={"ETag": f'"{config_etag(cfg)}"'})


def _not_found(vector: str) -> APIError:
    return APIError(404, f"no monitor for vector '{vector}'", type="not_found_error", code="monitor_not_found")


@router.get("/v1/monitors")
async def list_monitors(state: State, _admin: Admin):
    """Every monitor; the ``ETag`` covers the whole configuration, the same on every replica."""
    state.monitors.store.sync()  # reads of the configuration see every completed write, on any replica
    configs = state.monitors.configs()
    etag = state.monitors.list_etag()
    return JSONResponse({"object": "list", "data": [_view(c) for _, c in sorted(configs.items())]},
                        headers={"ETag": f'"{etag}"'})


@router.get("/v1/monitors/{vector}")
async def get_monitor(vector: str, state: State, _admin: Admin):
    """One monitor, with the ``ETag`` that a conditional ``PUT`` / ``DELETE`` names in ``If-Match``."""
    state.monitors.store.sync()
    config = state.monitors.get(vector)
    if config is None:
        raise _not_found(vector)
    return _tagged(config)


@router.put("/v1/monitors/{vector}")
async def put_monitor(vector: str, body: MonitorPut, state: State, who: Admin, if_match: IfMatch = None,
                      if_none_match: IfNoneMatch = None):
    """Create or replace the monitor on ``vector``. With ``If-Match`` it applies only if the
    monitor is still the one read (412 otherwise): of two admins racing, one wins."""
    config = MonitorConfig(vector=vector, **body.model_dump())
    if config.remediation:
        if "remediation" in state.engine.unsupported:
            raise UnsupportedOnEngineError(f"monitor remediation is not available on the {state.engine.name} engine",
                                           param="remediation")
        # The server's own steering: the ops caps do not refuse it, the bound on any steering does.
        remediation_terms(config, state.registry, state.settings.max_abs_coefficient)
    config = state.monitors.put(config, who=who, if_match=if_match, if_none_match=if_none_match)
    return _tagged(config)


@router.delete("/v1/monitors/{vector}")
async def delete_monitor(vector: str, state: State, who: Admin, if_match: IfMatch = None):
    try:
        state.monitors.delete(vector, who=who, if_match=if_match)
    except KeyError:
        raise _not_found(vector) from None
    return {"id": vector, "object": "monitor", "deleted": True}


async def prompt_scores(state: ServerState, vector_name: str, layer: int, kind: str, prompts: list[str]) -> list[float]:
    """Score each prompt's last token through the engine (prefill only, batched)."""
    vector = state.registry.get(vector_name)
    direction = vector.direction(layer)
    mean = float(vector.stats["neutral_mean"][layer]) if "neutral_mean" in vector.stats else None
    std = float(vector.stats["neutral_std"][layer]) if "neutral_std" in vector.stats else None

    encoded = [chat_prompt_ids(state.lm.tokenizer, [{"role": "user", "content": text}]) for text in prompts]
    for i, ids in enumerate(encoded):
        state.prompt_limit.check(len(ids), what=f"prompt {i}", param=f"prompts[{i}]")

    states = await EngineRunner(state.engine).last_states(encoded, [layer])
    projections = [scalar_projection(h, direction) for h in states[:, 0]]
    scores = [z_score(p, mean, std) for p in projections] if kind == "z" else projections
    return scores


@router.post("/v1/monitors/{vector}/calibrate")
async def calibrate(vector: str, body: CalibrateRequest, state: State, who: Admin, if_match: IfMatch = None):
    """Score benign prompts (given, or the built-in neutral set) and set thresholds so that
    the target shares of them would be flagged and blocked. Applying them is conditional on the
    monitor still being the one calibrated (412 if another write came in while scoring)."""
    if body.target_block_rate > body.target_flag_rate:
        raise APIError(400, "target_block_rate must not exceed target_flag_rate", param="target_block_rate")
    vec = state.registry.get(vector)
    current = state.monitors.get(vector)
    check_precondition(config_etag(current) if current else None, if_match=if_match, what=f"the monitor on '{vector}'")
    base = current or MonitorConfig(vector=vector, score="z" if "neutral_std" in vec.stats else "projection")
    base = base.validate(vec, state.lm.num_layers)
    prompts = body.prompts or json.loads(state.settings.neutral_prompts_file.read_text())["prompts"]
    scores = await state.jobs.run_inline(who, lambda: prompt_scores(state, vector, base.layer, base.score, prompts))
    flag, block = calibrate_thresholds(scores, body.target_flag_rate, body.target_block_rate)
    result = {
        "object": "monitor.calibration",
        "vector": vector,
        "layer": base.layer,
        "score": base.score,
        "n_prompts": len(scores),
        "source": "request" if body.prompts else "built-in neutral set",
        "percentiles": percentiles(scores),
        "flag_threshold": round(flag, 6),
        "block_threshold": round(block, 6),
        "flag_rate": sum(s > flag for s in scores) / len(scores),
        "block_rate": sum(s > block for s in scores) / len(scores),
        "applied": body.apply,
    }
    if body.apply:
        updated = MonitorConfig(**{**asdict(base), "flag_threshold": flag, "block_threshold": block})
        condition = {"if_match": f'"{config_etag(current)}"'} if current else {"if_none_match": "*"}
        result["monitor"] = _view(state.monitors.put(updated, who=who, **condition))
    return result
