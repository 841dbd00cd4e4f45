"""Prompt construction with the model's own chat template."""

from __future__ import annotations


def chat_prompt_ids(tokenizer, messages: list[dict], *, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of ``messages`` rendered by the tokenizer's chat template.

    Example::

        ids = chat_prompt_ids(tok, [{"role": "user", "content": "Hi"}])
    """
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def text_ids(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` alone, to be joined to other ids (no BOS or other special tokens)."""
    return tokenizer(text, add_special_tokens=False).input_ids


def completion_prompt_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a text completion's prompt, with the special tokens the tokenizer adds by
    default (BOS for Llama 3 and Gemma, which degrade without it), as vLLM encodes one.

    Example::

        ids = completion_prompt_ids(tok, "The sea is")
    """
    return tokenizer(text).input_ids
