"""``GET /v1/models``."""

from __future__ import annotations

from fastapi import APIRouter

from app.auth import User
from app.deps import State
from app.schemas import ModelCard, ModelList

router = APIRouter()


@router.get("/v1/models")
async def list_models(state: State, _user: User) -> ModelList:
    return ModelList(data=[ModelCard(id=state.lm.name, created=state.created)])
