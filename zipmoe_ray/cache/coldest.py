"""Per-form "coldest first" orders for the cache's victim searches, at a cost that does not grow with the
number of experts held.

Each cached form keeps a min-heap of ``(score, key, version)`` entries: popularity score first, then the
key, exactly the order in which a sorted scan of the form's members would offer victims. Entries are
invalidated lazily: a key's version moves on whenever it leaves or enters a form or its score changes
(every touch pushes a fresh entry), and stale entries are dropped when they reach the top. A search pops
what it needs (its victims, plus the pinned and the stale entries it meets) and puts back what stays, so
it costs O((victims + pinned + stale) log n), with stale entries paid for once by the pushes that made
them. When popularity renormalises its scale (every ~1,000 steps with decay 0.8) every stored score is
stale at once and the heaps are rebuilt; a heap that has grown to more than twice its live entries is
compacted. Both are O(n) but amortised over at least n pushes or about a thousand steps.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator

from .forms import Key

__all__ = ["ColdestFirst"]


class ColdestFirst:
    """The members of one form, coldest first. ``score(key)`` is the popularity's current score."""

    def __init__(self, score: Callable[[Key], float]):
        self.score = score
        self._heap: list[tuple[float, Key, int]] = []
        self._version: dict[Key, int] = {}  # live members only
        self._clock = 0

    def __len__(self) -> int:
        return len(self._version)

    def __contains__(self, key: Key) -> bool:
        return key in self._version

    def __iter__(self) -> Iterator[Key]:
        return iter(self._version)

    def _push(self, key: Key) -> None:
        self._clock += 1
        self._version[key] = self._clock
        heapq.heappush(self._heap, (self.score(key), key, self._clock))
        if len(self._heap) > 2 * len(self._version) + 64:
            self.rebuild()

    def add(self, key: Key) -> None:
        self._push(key)

    def discard(self, key: Key) -> None:
        self._version.pop(key, None)

    def rescored(self, key: Key) -> None:
        """``key``'s score changed: order it by the new one (a no-op for keys not in this form)."""
        version = self._version
        if key in version:
            self._clock += 1
            version[key] = self._clock
            heapq.heappush(self._heap, (self.score(key), key, self._clock))  # as _push, inlined: every touch
            if len(self._heap) > 2 * len(version) + 64:
                self.rebuild()

    def rebuild(self) -> None:
        """Re-read every member's score (after popularity rescaled them all) and drop stale entries."""
        self._clock += 1
        self._version = dict.fromkeys(self._version, self._clock)
        self._heap = [(self.score(k), k, self._clock) for k in self._version]
        heapq.heapify(self._heap)

    def _live(self, entry: tuple[float, Key, int]) -> bool:
        return self._version.get(entry[1]) == entry[2]

    def coldest(self, below: float, skip: Callable[[Key], bool]) -> Iterator[tuple[float, Key]]:
        """Members colder than ``below`` not ``skip``ped, coldest first (ties: smaller key first). The
        caller stops when it has enough and must then call :meth:`restore` before changing anything."""
        self._taken: list[tuple[float, Key, int]] = []
        heap = self._heap
        while heap:
            entry = heapq.heappop(heap)
            if not self._live(entry):
                continue  # stale: dropped for good
            self._taken.append(entry)
            if entry[0] >= below:
                return
            if skip(entry[1]):
                continue
            yield entry[0], entry[1]

    def restore(self) -> None:
        """Put back what the last :meth:`coldest` took (entries of keys that left the form since are
        dropped later, as stale)."""
        for entry in self._taken:
            heapq.heappush(self._heap, entry)
        self._taken = []
