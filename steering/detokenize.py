"""Incremental detokenization with stop strings, per request.

Text is streamed only once it is final: a partial UTF-8 character (shown by the
tokenizer as U+FFFD) and any tail that could still grow into a stop string are held back.
"""

from __future__ import annotations


class TextStream:
    """Accumulates generated token ids and yields the newly final text.

    Example::

        ts = TextStream(tokenizer, stop=("\\n\\n",))
        delta = ts.push(token_id)     # text safe to send now ('' if none)
        ts.stopped                    # True once a stop string appeared
        ts.flush()                    # the held-back tail at the end
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self._tok = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.token_ids: list[int] = []
        self.text = ""
        self._sent = 0
        self._final = 0  # len(text) without its trailing U+FFFD placeholders
        self.stopped = False
        # Decode only a short window: the text of ids[_prefix:] minus that of ids[_prefix:_read]
        # is what the newest tokens add (tokenizers merge across token boundaries, so the
        # window keeps one already-read chunk as context). _committed is the text of ids[:_read].
        self._prefix = 0
        self._read = 0
        self._committed = ""

    def _decoded(self) -> str:
        ids = self.token_ids
        before = self._tok.decode(ids[self._prefix : self._read], skip_special_tokens=True)
        after = self._tok.decode(ids[self._prefix :], skip_special_tokens=True)
        full = self._committed + after[len(before) :]
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._committed = full
            self._prefix, self._read = self._read, len(ids)
        return full

    def push(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        text = self._decoded()
        # Trailing U+FFFD stand for the bytes of a character not complete yet, and their number is
        # not that of the characters they become ("\ufffd\ufffd" turns into one "！"): positions
        # are counted on the text before them, or a stop ending in such a character is searched
        # for past its start and a stop's prefix is sent before the stop is seen.
        final = len(text.rstrip("\ufffd"))
        if self._stop:
            start = max(0, self._final - self._hold)
            hits = [i for i in (text.find(s, start) for s in self._stop) if i >= 0]
            if hits:
                self.text = text[: min(hits)]
                self.stopped = True
                return self.flush()
        self.text = text
        self._final = final
        safe = final - self._hold
        if safe <= self._sent:
            return ""
        delta = text[self._sent : safe]
        self._sent = safe
        return delta

    def flush(self) -> str:
        """Return whatever is still held back (call once the request is over)."""
        delta = self.text[self._sent :]
        self._sent = len(self.text)
        return delta
