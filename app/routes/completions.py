"""``POST /v1/completions``."""

from __future__ import annotations

from fastapi import APIRouter, Request

from app.auth import User
from app.deps import State
from app.generation import Renderer, build_request, check_token_ids, respond
from app.schemas import CompletionRequest
from steering.chat import completion_prompt_ids
from steering.engine import TokenOut

router = APIRouter()


def _final(index: int, text: str, finish: str, logprobs: dict | None) -> dict:
    return {"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}


def _chunk(index: int, text: str | None, finish: str | None, _first: bool, logprobs: dict | None) -> dict:
    return {"index": index, "text": text or "", "finish_reason": finish, "logprobs": logprobs}


def _logprobs(tokens: list[TokenOut], tokenizer, offset: int) -> dict:
    """The legacy completions ``logprobs`` object: parallel lists per token."""
    texts = [tokenizer.decode([t.token_id]) for t in tokens]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": texts,
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{tokenizer.decode([tid]): lp for tid, lp in t.top_logprobs or ()} for t in tokens],
        "text_offset": offsets,
    }


COMPLETION = Renderer("text_completion", "text_completion", "cmpl", _final, _chunk, _logprobs)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, state: State, http: Request, _user: User):
    if isinstance(body.prompt, str):
        prompt_ids = completion_prompt_ids(state.lm.tokenizer, body.prompt)
    else:
        check_token_ids(state, body.prompt, "prompt token ids", "prompt")
        prompt_ids = list(body.prompt)
    gen, monitor = build_request(state, body, prompt_ids, "prompt")
    return await respond(state, http, body, gen, monitor, COMPLETION, "/v1/completions")
