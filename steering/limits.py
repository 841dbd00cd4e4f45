"""How long a sequence work beside chat (screening, extraction, assessment, calibration) may
hand to the engine. Checked where the prompt ids are built, so an oversized input is refused
(or skipped) before it becomes a prefill wider than the context inside the live batch."""

from __future__ import annotations

from dataclasses import dataclass


class PromptTooLongError(ValueError):
    """A sequence would not fit; ``param`` names the input it came from."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class PromptLimit:
    """The model's context and the server's ``max_prompt_tokens`` (``None``: the context).

    A prefill may read at most :attr:`max_read` tokens, and what it reads plus what it then
    generates must fit in the context.

    Example::

        limit = PromptLimit(context_length=8192, max_prompt_tokens=4096)
        limit.check(len(prompt_ids), generate=64, what="line 7", param="line 7")
    """

    context_length: int
    max_prompt_tokens: int | None = None

    @property
    def max_read(self) -> int:
        if self.max_prompt_tokens is None:
            return self.context_length
        return min(self.max_prompt_tokens, self.context_length)

    def check(self, read: int, *, generate: int = 0, what: str = "the prompt", param: str | None = None) -> None:
        """Raise :class:`PromptTooLongError` unless ``read`` tokens, then ``generate`` more, fit."""
        if read > self.max_read:
            raise PromptTooLongError(f"{what} needs {read} tokens; at most {self.max_read} are accepted", param)
        if read + generate > self.context_length:
            raise PromptTooLongError(
                f"{what} needs {read} tokens plus {generate} to generate, beyond the model's context of "
                f"{self.context_length}", param)
