"""``POST /v1/chat/completions``."""

from __future__ import annotations

from fastapi import APIRouter, Request

from app.auth import User
from app.deps import State
from app.errors import APIError
from app.generation import Renderer, build_request, respond
from app.schemas import ChatCompletionRequest
from steering.chat import chat_prompt_ids

router = APIRouter()


def _final(text: str, finish: str) -> dict:
    return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": None}


def _chunk(text: str | None, finish: str | None, first: bool) -> dict:
    delta: dict = {}
    if first:
        delta["role"] = "assistant"
    if text is not None:
        delta["content"] = text
    return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}


CHAT = Renderer("chat.completion", "chat.completion.chunk", "chatcmpl", _final, _chunk)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, state: State, http: Request, _user: User):
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    if messages[-1]["role"] == "assistant":
        raise APIError(400, "the last message must not be from the assistant", param="messages")
    try:
        prompt_ids = chat_prompt_ids(state.lm.tokenizer, messages)
    except Exception as exc:  # the template itself refuses some role orders
        raise APIError(400, f"the model's chat template rejected the messages: {exc}", param="messages") from exc
    gen, monitor = build_request(state, body, prompt_ids, "messages")
    return await respond(state, http, body, gen, monitor, CHAT, "/v1/chat/completions")
