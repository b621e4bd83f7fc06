"""Expert popularity that ages: an exponentially decayed token count, or recency for LRU.

Aging is lazy: instead of multiplying every score by ``decay`` each step (O(experts)), new credit is scaled
up by ``1/decay`` per step and scores are renormalised when the scale grows large. Comparisons between
scores are what matters, and they are exact under this scheme.
"""

from __future__ import annotations

__all__ = ["DEFAULT_DECAY", "DEFAULT_POPULARITY", "POPULARITY_KINDS", "Popularity"]

POPULARITY_KINDS = ("lfu", "lru")
DEFAULT_POPULARITY = "lfu"  # the one default of every config that chooses a popularity (engine, scheduler)
DEFAULT_DECAY = 0.98  # per generation step


class Popularity:
    """Scores for keys; ``kind`` is ``lfu`` (decayed frequency, the default) or ``lru`` (last use).

    Both are kept up to date whatever the kind in use, so that the kind can change while running
    (``set_kind``: the online re-planning times classic offloading in both orders against the planned
    split); a change moves ``epoch`` on, since every order built on scores must be re-read."""

    def __init__(self, decay: float = DEFAULT_DECAY, kind: str = DEFAULT_POPULARITY):
        if not 0 < decay <= 1:
            raise ValueError(f"popularity decay must be in (0, 1], got {decay}")
        _check_kind(kind)
        self.decay = decay
        self.kind = kind
        self._scale = 1.0
        self._step = 0
        self._counts: dict = {}  # decayed token counts, in units of ``_scale``
        self._last: dict = {}  # the step of last use
        self.epoch = 0  # moves on when every score changes at once (orders built on scores must re-read)

    def set_kind(self, kind: str) -> None:
        """Rank by ``kind`` from now on (the history of both is kept)."""
        _check_kind(kind)
        if kind != self.kind:
            self.kind = kind
            self.epoch += 1

    def touch(self, key, tokens: int = 1) -> None:
        self._last[key] = float(self._step)
        self._counts[key] = self._counts.get(key, 0.0) + tokens * self._scale

    def step(self) -> None:
        """Advance time by one generation step (ages every count by ``decay``)."""
        self._step += 1
        if self.decay < 1:
            self._scale /= self.decay
            if self._scale > 1e100:
                for k in self._counts:
                    self._counts[k] /= self._scale
                self._scale = 1.0
                self.epoch += self.kind == "lfu"  # LRU's order is unchanged

    def score(self, key) -> float:
        """Comparable score (higher = more popular); 0 for keys never seen (-1 for LRU)."""
        if self.kind == "lru":
            return self._last.get(key, -1.0)
        return self._counts.get(key, 0.0)

    def seed(self, key, value: float) -> None:
        """Set a prior count (e.g. from a trace) in current units; LRU's order knows no prior."""
        self._counts[key] = value * self._scale

    def value(self, key) -> float:
        """The decayed token count in today's units (LFU) or the last step used (LRU)."""
        s = self.score(key)
        return s / self._scale if self.kind == "lfu" else s


def _check_kind(kind: str) -> None:
    if kind not in POPULARITY_KINDS:
        raise ValueError(f"popularity kind must be lfu or lru, got {kind!r}")
