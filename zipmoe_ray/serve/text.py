"""Text of one generated sequence as its tokens arrive: incremental detokenization and stop sequences.

The text a stream sends adds up to exactly what the non-streamed answer holds (``decode`` of every token,
cut before the first stop sequence): a piece is sent only once it can no longer change, i.e. it does not end
in an incomplete UTF-8 character (decoded as U+FFFD) and is not the start of a stop sequence.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["RowText"]


class RowText:
    """Not thread-safe: one owner (the batcher's generation thread)."""

    def __init__(self, decode: Callable[[list[int]], str], stops: tuple[str, ...] = ()):
        self._decode = decode
        self.stops = stops
        self.ids: list[int] = []
        self.text = ""  # the answer so far (cut at a stop sequence once one appeared)
        self.sent = 0  # characters of ``text`` handed out
        self.stopped = False  # a stop sequence appeared: the answer is complete

    def add(self, token: int) -> str:
        """Take the next token; return the text that became final (possibly empty)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        text = self._decode(self.ids)
        cut = self._first_stop(text)
        if cut is not None:
            self.text, self.stopped = text[:cut], True
            return self._take(len(self.text))
        self.text = text
        safe = len(text)
        while safe > self.sent and text[safe - 1] == "\ufffd":  # an incomplete character may follow
            safe -= 1
        safe -= self._stop_prefix(text[:safe])
        return self._take(safe)

    def flush(self) -> str:
        """The sequence ended: the rest of the text."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        if end <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent : end], end
        return piece

    def _first_stop(self, text: str) -> int | None:
        if not self.stops:
            return None
        longest = max(len(s) for s in self.stops)
        start = max(0, self.sent - longest)
        hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def _stop_prefix(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins a stop sequence (held back until resolved)."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
