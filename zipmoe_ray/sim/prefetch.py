"""The executor's prefetch, replayed in the simulator from a trace's recorded predictions.

What the ExpertClient does (stages/client.py), on the virtual clock: while layer L is served, the prediction
recorded for layer L+1 goes to the Scheduler's ``prefetch`` right after L's request (or at L's start when
L misses nothing), unless the precision gate is shut (stages/prefetch_gate.py, the client's own gate), in
which case it is only scored. When L+1 routes, the predicted experts it uses are taken from the prefetch's
answer (computed when ready, after L+1's FULL hits) and reported used with the next request or step; the
wrong ones are released like any fetch. Only the executor's side is modelled here: admission, staging and
what a prefetch may take are the Scheduler's own code.
"""

from __future__ import annotations

from ..cache.forms import Form
from ..stages.prefetch_gate import PrefetchGate
from .runner import delivery_ready

__all__ = ["SimPrefetch"]


class SimPrefetch:
    def __init__(self) -> None:
        self.gate = PrefetchGate()
        self.guess: tuple[int, list[tuple[int, int]]] | None = None  # (next layer, its recorded prediction)
        self._pending: dict[int, list[tuple[int, float]]] = {}  # layer -> its prefetch's (expert, ready)
        self.prefetched: dict[tuple[int, int], float] = {}  # arrived for a layer not yet routed: ready time
        self._shadow: dict[int, list[int]] = {}  # gated predictions, scored when their layer routes
        self.used: list[tuple[int, int, int]] = []  # (layer, expert, tokens) to report
        self.reset_stats()

    def route(self, layer: int, picks, cache) -> tuple[list, list, list, list]:
        """``layer`` routes to ``picks``: its prefetch's answer arrives. Returns (FULL hits, prefetched
        experts it uses as (ready, expert), misses, the wrong guesses to release)."""
        for e, ready in self._pending.pop(layer, ()):
            self.prefetched[(layer, e)] = ready
        entries = cache.entries
        hits, early, misses = [], [], []
        for e, tok in picks:
            key = (layer, e)
            ready = self.prefetched.pop(key, None)
            if ready is not None:
                early.append((ready, e))
                self.used.append((layer, e, tok))
            elif entries[key].form == Form.FULL:
                hits.append((e, tok))
            else:
                misses.append((e, tok))
        wrong = [k for k in self.prefetched if k[0] == layer]
        for k in wrong:
            del self.prefetched[k]
        routed = {e for e, _ in picks}
        shadow = self._shadow.pop(layer, ())
        self.gate.scored(len(early) + sum(e in routed for e in shadow), len(early) + len(wrong) + len(shadow))
        self.used_count += len(early)
        self.wasted += len(wrong)
        self.needed += len(early) + len(misses)
        return hits, early, misses, wrong

    def issue(self, sched, runner, t: float, released: list) -> list:
        """At time ``t``, fetch the noted guess's experts not held or already on their way (or score it
        only, the gate shut); returns ``released`` emptied when it went out with the prefetch."""
        if self.guess is None:
            return released
        (layer, guess), self.guess = self.guess, None
        entries = sched.cache.entries
        picks = [
            (e, tok)
            for e, tok in guess
            if entries[(layer, e)].form != Form.FULL and (layer, e) not in self.prefetched
        ]
        if not picks:
            return released
        if not self.gate.open:
            self._shadow[layer] = [e for e, _ in picks]
            self.gated += 1
            return released
        runner.now = t
        resp = sched.prefetch(layer, picks, released, self.take_used())
        self._pending[layer] = [(d.expert, delivery_ready(d)) for d in resp.deliveries]
        self.predicted += len(picks)
        return []

    def reset_stats(self) -> None:
        """Zero the counters (the gate and what is on its way are kept)."""
        self.predicted = self.used_count = self.wasted = self.needed = self.gated = 0

    def take_used(self) -> list[tuple[int, int, int]]:
        used, self.used = self.used, []
        return used

    def report(self) -> dict:
        return {
            "predicted": self.predicted,
            "used": self.used_count,
            "wasted": self.wasted,
            "recall": self.used_count / self.needed if self.needed else None,
            "gated": self.gated,
            "running_precision": self.gate.precision,
        }
