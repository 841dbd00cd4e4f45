"""``POST /v1/completions``."""

from __future__ import annotations

from fastapi import APIRouter, Request

from app.auth import User
from app.deps import State
from app.errors import APIError
from app.generation import Renderer, build_request, respond
from app.schemas import CompletionRequest
from steering.chat import text_ids

router = APIRouter()


def _final(text: str, finish: str) -> dict:
    return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}


def _chunk(text: str | None, finish: str | None, _first: bool) -> dict:
    return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}


COMPLETION = Renderer("text_completion", "text_completion", "cmpl", _final, _chunk)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, state: State, http: Request, _user: User):
    if isinstance(body.prompt, str):
        prompt_ids = text_ids(state.lm.tokenizer, body.prompt)
    else:
        vocab = len(state.lm.tokenizer)
        if any(not 0 <= t < vocab for t in body.prompt):
            raise APIError(400, f"prompt token ids must be in 0..{vocab - 1}", param="prompt")
        prompt_ids = list(body.prompt)
    gen, monitor = build_request(state, body, prompt_ids, "prompt")
    return await respond(state, http, body, gen, monitor, COMPLETION, "/v1/completions")
