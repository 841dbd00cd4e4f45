"""``GET /v1/models`` and ``GET /v1/models/{model}``: the served model, its ``default`` alias and
the loaded LoRA adapters."""

from __future__ import annotations

from fastapi import APIRouter

from app.auth import User
from app.deps import ServerState, State
from app.generation import check_model
from app.schemas import ModelCard, ModelList

router = APIRouter()


def model_cards(state: ServerState) -> list[ModelCard]:
    """The served model, then ``default`` as its own entry whose ``root`` is the served model
    (vLLM lists every served name this way), each with the context length as ``max_model_len``; then
    each adapter with the served model as its ``parent``, as vLLM lists LoRA adapters."""
    names = list(dict.fromkeys((state.lm.name, "default")))
    cards = [ModelCard(id=name, created=state.created, root=state.lm.name, max_model_len=state.engine.max_model_len)
             for name in names]
    cards += [ModelCard(id=a.name, created=state.created, root=a.name, parent=state.lm.name,
                        max_model_len=state.engine.max_model_len) for a in state.adapters.list()]
    return cards


@router.get("/v1/models")
async def list_models(state: State, _user: User) -> ModelList:
    return ModelList(data=model_cards(state))


@router.get("/v1/models/{model}")
async def get_model(model: str, state: State, _user: User) -> ModelCard:
    check_model(state, model)
    return next(card for card in model_cards(state) if card.id == model)
