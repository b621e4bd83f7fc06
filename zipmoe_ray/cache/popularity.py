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
    """Scores for keys; ``kind`` is ``lfu`` (decayed frequency, the default) or ``lru`` (last use)."""

    def __init__(self, decay: float = DEFAULT_DECAY, kind: str = DEFAULT_POPULARITY):
        if not 0 < decay <= 1:
            raise ValueError(f"popularity decay must be in (0, 1], got {decay}")
        if kind not in POPULARITY_KINDS:
            raise ValueError(f"popularity kind must be lfu or lru, got {kind!r}")
        self.decay = decay
        self.kind = kind
        self._scale = 1.0
        self._step = 0
        self._scores: dict = {}
        self._unseen = -1.0 if kind == "lru" else 0.0  # the score of a key never seen
        self.epoch = 0  # moves on when every score is rescaled at once (orders built on scores must re-read)

    def touch(self, key, tokens: int = 1) -> None:
        if self.kind == "lru":
            self._scores[key] = float(self._step)
        else:
            self._scores[key] = self._scores.get(key, 0.0) + tokens * self._scale

    def step(self) -> None:
        """Advance time by one generation step (ages every score by ``decay``)."""
        self._step += 1
        if self.kind == "lfu" and self.decay < 1:
            self._scale /= self.decay
            if self._scale > 1e100:
                for k in self._scores:
                    self._scores[k] /= self._scale
                self._scale = 1.0
                self.epoch += 1

    def score(self, key) -> float:
        """Comparable score (higher = more popular); 0 for keys never seen (-1 for LRU)."""
        return self._scores.get(key, self._unseen)

    def seed(self, key, value: float) -> None:
        """Set a prior score (e.g. from a trace) in current units."""
        self._scores[key] = value * self._scale

    def value(self, key) -> float:
        """The decayed token count in today's units (LFU) or the last step used (LRU)."""
        s = self.score(key)
        return s / self._scale if self.kind == "lfu" else s
