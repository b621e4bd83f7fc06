"""Expert popularity that ages: an exponentially decayed token count, or recency for LRU.

The default memory is short: a count decayed by 0.8 per generation step (a half-life of about three
steps). It keeps more than recency at batch 1, where consecutive tokens reuse experts, and nearly what a
long count keeps at batch 8, where a step touches most experts and recency forgets the popular ones. Measured
in one process (Qwen1.5-MoE preset, 4 MoE layers, the model's own routing, full experts only, 25% budget,
0.5 GB/s emulated SSD, local backend, 2-core VM, 2026-12-06), decode tokens per second at batch 1 / 8:
decay 0.8 3.38 / 4.74, decay 0.98 2.99 / 4.96, LRU 3.24 / 4.34; replays of recorded traces of that model
and of its skew-0 twin give the same order (fewer misses than LRU at batch 1 and 4, as few as 0.98 at 8).

Aging is lazy: instead of multiplying every score by ``decay`` each step (O(experts)), new credit is scaled
up by ``1/decay`` per step and scores are renormalised when the scale grows large (every ~1,000 steps at
0.8). Comparisons between scores are what matters, and they are exact under this scheme.
"""

from __future__ import annotations

__all__ = ["DEFAULT_DECAY", "DEFAULT_POPULARITY", "POPULARITY_KINDS", "Popularity"]

POPULARITY_KINDS = ("lfu", "lru")
DEFAULT_POPULARITY = "lfu"  # the one default of every config that chooses a popularity (engine, scheduler)
DEFAULT_DECAY = 0.8  # per generation step (see the module docstring)


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
        """Set a prior count (e.g. from a trace) in current units; LRU's order knows no prior."""
        if self.kind == "lfu":
            self._scores[key] = value * self._scale

    def value(self, key) -> float:
        """The decayed token count in today's units (LFU) or the last step used (LRU)."""
        s = self.score(key)
        return s / self._scale if self.kind == "lfu" else s
