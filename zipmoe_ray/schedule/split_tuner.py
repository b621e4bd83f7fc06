"""Online re-planning of the split between cache forms, from decode steps timed while the model runs.

The start-up plan prices decoding with lane rates calibrated on an idle machine. Beside the model on
shared cores the lanes run slower, and every decode takes cores from the model's own compute; on a 2-core
CPU box a cache of compressed experts can lose to plain full-BF16 offloading for that reason alone. So the
engine measures instead of trusting the model: each round it runs every candidate (the start-up plan, and
classic offloading's split, full experts only, always among them) for a few decode steps, lets the cache
settle into it, times the steps that follow, and keeps the candidate whose median step was the shortest.
The split in use stays unless another is faster by more than ``MARGIN``. A round starts at once and then
every ``every`` decode steps, so a change of workload (another prompt mix) is seen.

Only decode steps count (a prefill's length says nothing about the split), and only steps of one batch
size are compared: each batch size has its own rounds and its own choice. A server's batch size changes
with every generation (a batch of 8 prompts, then 1, then 4) and a generation is often shorter than a
round, so a round interrupted by another batch size is paused, not lost: when that size comes back, the
split it was timing is put in use again, settles again, and the round goes on with the samples it had. A
size whose round has ended gets the split chosen for it at once. Only the first batch size is timed at
once; a size seen later has its first round after ``every`` of its own steps, like any later round: timing
a losing candidate costs steps, and on a server that meets a new size with every generation, rounds at once
would keep timing the loser (measured: bench_serve, 8 clients 9% slower that way on this project's 2-core
VM, when full-only won at every size). Until its round, a new size starts on the split kept for the size
before it, unless it is *wide* and that one was not (``wide_from``, see ``wide_batch``): its decode steps
touch more distinct experts per layer than a cache of full experts only can hold, so that no cache of full
experts keeps even one step's experts and the reuse between consecutive steps, which a full LRU exploits at
small batches and the start-up plan's cost model ignores, no longer decides; there it starts on the
start-up plan (measured: bench_serve, 8 clients after 1 at 25%, 0.5 GB/s, 1.78x one at a time against
1.59x on the inherited full-only, one run each, 2026-12-07).

Each step is one sample; nothing here reads a clock or touches the cache: the Scheduler feeds it the step
times the executor measured and applies the split it returns (Scheduler.set_split).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from statistics import median

from ..cache.split import SplitRule

__all__ = ["MARGIN", "SETTLE_STEPS", "WINDOW_STEPS", "SplitTuner", "wide_batch"]

SETTLE_STEPS = 3  # decode steps not timed after a switch: the cache refills in the new split's forms
WINDOW_STEPS = 6  # decode steps timed per candidate and round (their median is the candidate's score)
MARGIN = 0.05  # another candidate must be this much faster than the split in use to replace it


def wide_batch(experts: float, top_k: int, full_held: float, limit: int = 4096) -> int | None:
    """The smallest batch size whose decode step routes, on uniform routing, to more distinct experts of a
    layer (of ``experts``, ``top_k`` each row: ``experts * (1 - (1 - top_k / experts) ** rows)`` expected)
    than the ``full_held`` experts of a layer that a cache of full experts only holds; None if no size up
    to ``limit`` does (the cache holds nearly every expert)."""
    if experts <= 0 or top_k <= 0:
        return None
    miss = 1.0 - min(top_k, experts) / experts
    for rows in range(1, limit + 1):
        if experts * (1.0 - miss**rows) > full_held:
            return rows
    return None


@dataclass
class _Size:
    """One batch size's re-planning: its choice, and its round while one runs."""

    chosen: int  # the split kept for this size (before its first round ends: the one in use when it began)
    queue: list[int] = field(default_factory=list)  # candidates still to time this round (the first: timing)
    incumbent: int = 0  # the split in use when the round began
    scores: dict[int, float] = field(default_factory=dict)  # this round's medians so far
    samples: list[float] = field(default_factory=list)  # of the candidate being timed
    held: int = 0  # decode steps of this size since its last round ended


@dataclass
class SplitTuner:
    """Chooses among ``candidates`` ((name, SplitRule), the start-up split first) by measured step time, per
    batch size. ``every``: decode steps of one batch size between its rounds (the first batch size's first
    round starts at once). ``wide_from``: the smallest wide batch size (``wide_batch``; None: none is), which
    starts on the start-up plan (the first candidate) when it follows a narrower size."""

    candidates: list[tuple[str, SplitRule]]
    every: int = 256
    wide_from: int | None = None
    settle: int = SETTLE_STEPS
    window: int = WINDOW_STEPS
    current: int = 0  # index of the split in use
    rounds: int = 0  # rounds completed (all batch sizes)
    switches: int = 0  # rounds that ended on another split than the one in use when they began
    changes: int = 0  # splits put in use (to time a candidate, to come back, or to keep a faster one)
    scores: dict[str, float] = field(default_factory=dict)  # the last round's median decode-step seconds
    _sizes: dict[int, _Size] = field(default_factory=dict)  # by rows
    _rows: int | None = None  # batch size of the last sample
    _last: dict[int, dict[str, float]] = field(default_factory=dict)  # each size's last round's scores
    _since: int = 0  # decode steps run on the split in use since it was put in use (any batch size)

    def __post_init__(self):
        if len(self.candidates) < 2:
            raise ValueError("a split tuner needs at least two candidates")
        if self.every < 1 or self.window < 1 or self.settle < 0:
            raise ValueError("every and window must be at least 1, settle at least 0")

    @property
    def name(self) -> str:
        """The name of the split in use."""
        return self.candidates[self.current][0]

    @property
    def measuring(self) -> bool:
        """A round runs for the batch size of the last sample (or, before any sample, will start at once)."""
        s = self._sizes.get(self._rows) if self._rows is not None else None
        return s is None or bool(s.queue)

    def _begin(self, s: _Size) -> None:
        s.incumbent = self.current
        s.queue = [self.current] + [i for i in range(len(self.candidates)) if i != self.current]
        s.scores, s.samples = {}, []

    def observe(self, seconds: float, rows: int = 1) -> SplitRule | None:
        """One decode step of ``rows`` sequences took ``seconds``; returns the split to switch to now, or
        None to keep the one in use."""
        before = self.current
        self._since += 1  # the step just timed ran on the split in use
        self._observe(seconds, rows)
        if self.current == before:
            return None
        self.changes += 1
        self._since = 0
        return self.candidates[self.current][1]

    def _put(self, index: int) -> None:
        """Put split ``index`` in use now: the step just observed ran on the one before, and the cache
        refills for ``settle`` steps before a step counts as a sample."""
        if index != self.current:
            self.current, self._since = index, 0

    def _observe(self, seconds: float, rows: int) -> None:
        s = self._sizes.get(rows)
        if rows != self._rows:  # another batch size: its own round or choice, never compared with this one
            before = self._rows
            prev = self._sizes.get(before) if before is not None else None
            self._rows = rows
            if s is None:  # first seen: timed at once if it is the first size, else started (_first_split)
                s = self._sizes[rows] = _Size(
                    chosen=self.current if prev is None else self._first_split(rows, before)
                )
                if prev is None:
                    self._begin(s)
                else:
                    self._put(s.chosen)
            elif (
                s.queue
            ):  # its round was paused: the split it was timing again (settling again if it changes)
                self._put(s.queue[0])
            else:
                self._put(s.chosen)
        if not s.queue:
            s.held += 1
            if s.held < self.every:
                return
            self._begin(s)  # times the split in use first: at once if it has settled
        if self._since <= self.settle:  # this step ran on another split, or on a cache still refilling
            return
        s.samples.append(seconds)
        if len(s.samples) < self.window:
            return
        s.scores[self.current] = median(s.samples)
        s.queue.pop(0)
        s.samples = []
        if s.queue:  # time the next candidate
            self._put(s.queue[0])
            return
        self._decide(s, rows)

    def _first_split(self, rows: int, before: int) -> int:
        """The split a batch size seen after ``before`` starts on until its first round: the one kept for
        ``before``, or the start-up plan where ``rows`` is wide and ``before`` was not (module docstring)."""
        if self.wide_from is not None and rows >= self.wide_from > before:
            return 0
        return self._sizes[before].chosen

    def _decide(self, s: _Size, rows: int) -> None:
        r = s.scores
        self.rounds += 1
        self.scores = self._last[rows] = {self.candidates[i][0]: v for i, v in sorted(r.items())}
        best = min(r, key=lambda i: (r[i], i))
        keep = best if r[best] < r[s.incumbent] * (1 - MARGIN) else s.incumbent
        self.switches += keep != s.incumbent
        s.held, s.chosen = 0, keep
        self._put(keep)

    def report(self) -> dict:
        """For stats(): the split in use, the last round's scores, rounds and switches, and per batch size
        the split it keeps (while its round runs: the one in use when the round began), whether a round
        runs, and its last round's scores."""
        return {
            "in_use": self.name,
            "measuring": self.measuring,
            "step_s": dict(self.scores),
            "rounds": self.rounds,
            "switches": self.switches,
            "changes": self.changes,
            "every_steps": self.every,
            "wide_from": self.wide_from,
            "by_batch": {
                rows: {
                    "split": self.candidates[s.chosen][0],
                    "measuring": bool(s.queue),
                    "step_s": dict(self._last.get(rows, {})),
                }
                for rows, s in sorted(self._sizes.items())
            },
        }
