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
        if self._stop:
            start = max(0, len(self.text) - self._hold)
            hits = [i for i in (text.find(s, start) for s in self._stop) if i >= 0]
            if hits:
                self.text = text[: min(hits)]
                self.stopped = True
                return self.flush()
        self.text = text
        safe = len(text) - self._hold
        while safe > self._sent and text[safe - 1] == "\ufffd":
            safe -= 1
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
