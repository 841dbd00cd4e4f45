"""vLLM's ``POST /tokenize`` and ``POST /detokenize``: the token ids a prompt or a chat becomes
(exactly what the generation routes count), and the text of token ids."""

from __future__ import annotations

from fastapi import APIRouter

from app.auth import User
from app.deps import State
from app.errors import APIError
from app.generation import check_model, check_token_ids
from app.routes.chat import chat_text
from app.schemas import DetokenizeRequest, TokenizeRequest

router = APIRouter()


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, state: State, _user: User):
    if body.model is not None:
        check_model(state, body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of 'prompt' (text) or 'messages' (a chat)", param="prompt")
    tokenizer = state.lm.tokenizer
    text = body.prompt if body.messages is None else chat_text(
        state, body.messages, add_generation_prompt=body.add_generation_prompt)
    special = body.messages is None if body.add_special_tokens is None else body.add_special_tokens
    tokens = tokenizer(text, add_special_tokens=special).input_ids
    return {
        "count": len(tokens),
        "max_model_len": state.engine.max_model_len,
        "tokens": tokens,
        "token_strs": tokenizer.convert_ids_to_tokens(tokens) if body.return_token_strs else None,
    }


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, state: State, _user: User):
    if body.model is not None:
        check_model(state, body.model)
    check_token_ids(state, body.tokens, "token ids", "tokens[{i}]")
    return {"prompt": state.lm.tokenizer.decode(body.tokens)}
