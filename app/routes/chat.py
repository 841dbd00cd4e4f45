"""``POST /v1/chat/completions``."""

from __future__ import annotations

from fastapi import APIRouter, Request

from app.auth import User
from app.deps import State
from app.errors import APIError
from app.generation import Renderer, build_request, respond
from app.schemas import ChatCompletionRequest
from steering.chat import chat_prompt_ids
from steering.engine import TokenOut

router = APIRouter()


def _final(index: int, text: str, finish: str, logprobs: dict | None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
            "logprobs": logprobs}


def _chunk(index: int, text: str | None, finish: str | None, first: bool, logprobs: dict | None) -> dict:
    delta: dict = {}
    if first:
        delta["role"] = "assistant"
    if text is not None:
        delta["content"] = text
    return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}


def _entry(tokenizer, token_id: int, logprob: float) -> dict:
    text = tokenizer.decode([token_id])
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def _logprobs(tokens: list[TokenOut], tokenizer, _offset: int) -> dict:
    """OpenAI's chat ``logprobs`` object: per token its text, log-probability, bytes and top alternatives."""
    return {"content": [
        {**_entry(tokenizer, t.token_id, t.logprob),
         "top_logprobs": [_entry(tokenizer, tid, lp) for tid, lp in t.top_logprobs or ()]}
        for t in tokens
    ]}


CHAT = Renderer("chat.completion", "chat.completion.chunk", "chatcmpl", _final, _chunk, _logprobs)


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
