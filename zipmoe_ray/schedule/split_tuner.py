"""Online re-planning of the split between cache forms, from decode steps timed while the model runs.

The start-up plan prices decoding with lane rates calibrated on an idle machine. Beside the model on
shared cores the lanes run slower, and every decode takes cores from the model's own compute; on a 2-core
CPU box a cache of compressed experts can lose to plain full-BF16 offloading for that reason alone. So the
engine measures instead of trusting the model: each round it runs every candidate (the start-up plan, and
classic offloading's split, full experts only, always among them) for a few decode steps, lets the cache
settle into it, times the steps that follow, and keeps the candidate whose median step was the shortest.
The split in use stays unless another is faster by more than ``MARGIN``. A round starts at once and then
every ``every`` decode steps, so a change of workload (another prompt mix, batch size) is seen.

Only decode steps count (a prefill's length says nothing about the split), and only steps of one batch
size are compared within a round: when the batch size changes, the round restarts from the split in use.
Each step is one sample; nothing here reads a clock or touches the cache: the Scheduler feeds it the step
times the executor measured and applies the split it returns (Scheduler.set_split).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from statistics import median

from ..cache.split import SplitRule

__all__ = ["MARGIN", "SETTLE_STEPS", "WINDOW_STEPS", "SplitTuner"]

SETTLE_STEPS = 3  # decode steps not timed after a switch: the cache refills in the new split's forms
WINDOW_STEPS = 6  # decode steps timed per candidate and round (their median is the candidate's score)
MARGIN = 0.05  # another candidate must be this much faster than the split in use to replace it


@dataclass
class SplitTuner:
    """Chooses among ``candidates`` ((name, SplitRule), the start-up split first) by measured step time.
    ``every``: decode steps between rounds (the first round starts at once)."""

    candidates: list[tuple[str, SplitRule]]
    every: int = 256
    settle: int = SETTLE_STEPS
    window: int = WINDOW_STEPS
    current: int = 0  # index of the split in use
    rounds: int = 0  # rounds completed
    switches: int = 0  # rounds that ended on another split than the one in use when they began
    changes: int = 0  # splits put in use (to time a candidate, to come back, or to keep a faster one)
    scores: dict[str, float] = field(default_factory=dict)  # the last round's median decode-step seconds
    _queue: list[int] = field(default_factory=list)  # candidates still to time this round (the first in use)
    _incumbent: int = 0  # the split in use when the round began
    _round: dict[int, float] = field(default_factory=dict)
    _rows: int | None = None  # batch size of this round's samples
    _seen: int = 0  # decode steps since the candidate being timed was put in use
    _settle_now: int = 0
    _samples: list[float] = field(default_factory=list)
    _held: int = 0  # decode steps since the last round ended

    def __post_init__(self):
        if len(self.candidates) < 2:
            raise ValueError("a split tuner needs at least two candidates")
        if self.every < 1 or self.window < 1 or self.settle < 0:
            raise ValueError("every and window must be at least 1, settle at least 0")
        self._begin(warm=False)

    @property
    def name(self) -> str:
        """The name of the split in use."""
        return self.candidates[self.current][0]

    @property
    def measuring(self) -> bool:
        return bool(self._queue)

    def _begin(self, warm: bool) -> None:
        self._incumbent = self.current
        self._queue = [self.current] + [i for i in range(len(self.candidates)) if i != self.current]
        self._round, self._samples, self._rows, self._seen = {}, [], None, 0
        self._settle_now = 0 if warm else self.settle

    def observe(self, seconds: float, rows: int = 1) -> SplitRule | None:
        """One decode step of ``rows`` sequences took ``seconds``; returns the split to switch to now, or
        None to keep the one in use."""
        rule = self._observe(seconds, rows)
        self.changes += rule is not None
        return rule

    def _observe(self, seconds: float, rows: int) -> SplitRule | None:
        if not self._queue:
            self._held += 1
            if self._held < self.every:
                return None
            self._begin(warm=True)  # the split in use has been running: time it at once
        if self._rows is not None and rows != self._rows:  # another batch size: compare like with like
            back = self.current != self._incumbent
            self.current = self._incumbent
            self._begin(warm=not back)
            if back:
                return self.candidates[self.current][1]
        self._rows = rows
        self._seen += 1
        if self._seen <= self._settle_now:
            return None
        self._samples.append(seconds)
        if len(self._samples) < self.window:
            return None
        self._round[self.current] = median(self._samples)
        self._queue.pop(0)
        self._samples, self._seen, self._settle_now = [], 0, self.settle
        if self._queue:  # time the next candidate
            self.current = self._queue[0]
            return self.candidates[self.current][1]
        return self._decide()

    def _decide(self) -> SplitRule | None:
        r = self._round
        self.rounds += 1
        self.scores = {self.candidates[i][0]: s for i, s in sorted(r.items())}
        best = min(r, key=lambda i: (r[i], i))
        keep = best if r[best] < r[self._incumbent] * (1 - MARGIN) else self._incumbent
        self.switches += keep != self._incumbent
        self._held = 0
        timed_last, self.current = self.current, keep
        return self.candidates[keep][1] if keep != timed_last else None

    def report(self) -> dict:
        """For stats(): the split in use, the last round's scores, rounds and switches."""
        return {
            "in_use": self.name,
            "measuring": self.measuring,
            "step_s": dict(self.scores),
            "rounds": self.rounds,
            "switches": self.switches,
            "changes": self.changes,
            "every_steps": self.every,
        }
