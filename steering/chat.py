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
    return tokenizer(text, add_special_tokens=False).input_ids
