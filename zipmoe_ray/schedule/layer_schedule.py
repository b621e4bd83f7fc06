"""Cache-affinity scheduling of one MoE layer's missing experts over one I/O lane and W decode lanes.

Each missing expert j is a task with an I/O time a_j (0 when its bytes are already in memory: the
COMPRESSED form) and a CPU time b_j (decompress + recombine on one of W workers; 0 for raw-codec reads).
A task's decode can start only after its read. The makespan is when the last expert is decoded; the
executor computes each expert as soon as it is decoded, so finishing early matters as much as finishing.

Algorithm (``plan_layer``):
  1. I/O lane order, Johnson's rule extended to W decode lanes: first the tasks whose read is shorter than
     their decode (SM-only hits: a short read of the exponent region), by increasing read time, so decode
     lanes get work early; then the others (disk misses), by decreasing decode time. Ties: more tokens first.
     The lane never idles: reads run back to back from t = 0.
  2. Decode lanes, non-delay list scheduling: whenever a lane is free it takes the ready piece (already
     read, or needing no read) with the most tokens (ties: earliest ready); a lane idles only while no
     piece is ready. An expert's decode is cut into ``parts`` pieces (its exponent shards are independent,
     so up to K lanes can decode one expert at once): the expert after the last read is then decoded by
     several lanes instead of one. CPU-only tasks (COMPRESSED hits) are ready at t = 0 and fill the gaps
     while reads run, so the I/O lane and the decode lanes finish together. ``pieces_for`` chooses how
     many pieces: the fewest that let every lane work (a layer with fewer decodes than lanes), not more,
     since each piece is one more task to submit and deliver. Among lanes free at once, the caller's
     preference order decides (the scheduler puts the least loaded first, so lanes share a run evenly).

Guarantee: makespan <= (3 - 1/W) * OPT, OPT the optimum of the same pieces. Proof (pieces as tasks, b_j a
piece's decode; cutting decodes into pieces can only lower OPT, so the bound also holds against the optimum
of uncut tasks): OPT >= A := sum_j a_j (one I/O lane), OPT >= sum_j b_j / W (W decode lanes), OPT >=
max_j b_j. Let k be the piece that finishes last and s_k its start. All reads end by A, so every piece is
ready from A on; in [A, s_k) no lane idles while k waits, so those lanes work on other pieces:
s_k - A <= (sum_j b_j - b_k) / W. Hence C_max = s_k + b_k <= A + sum_j b_j / W + (1 - 1/W) b_k
<= (3 - 1/W) OPT. The bound needs only that the I/O lane never idles and the decode lanes are non-delay,
so it holds for any priority order; the orders above are what make the typical case close to OPT
(tests/unit/test_layer_schedule.py compares against brute-force optima on random instances, with and
without pieces).
"""

from __future__ import annotations

import functools
import heapq
from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = [
    "LayerPlan",
    "Outline",
    "Piece",
    "Task",
    "makespan_of",
    "outline_layer",
    "pieces_for",
    "plan_layer",
]


class Task(NamedTuple):
    """One missing expert of a layer (a tuple: made for every miss, so it must be cheap to make)."""

    key: tuple[int, int]
    io: float  # seconds on the I/O lane (0: no read)
    cpu: float  # seconds on a decode lane (0: no decode), for the whole expert
    tokens: int = 1
    tag: object = None  # caller data (form, sizes, ...)
    parts: int = 1  # pieces the decode may be cut into (<= its shards)


class Piece:
    """One lane's share of a task's decode: the ``index``-th of ``count`` pieces (whole exponent shards)."""

    __slots__ = ("count", "cpu", "index", "key", "task", "tokens")

    def __init__(self, task: Task, index: int, count: int):
        self.task = task
        self.index = index  # 0..count-1
        self.count = count
        self.key = task.key
        self.cpu = task.cpu / count
        self.tokens = task.tokens

    def __eq__(self, other) -> bool:
        return isinstance(other, Piece) and (self.task, self.index, self.count) == (
            other.task,
            other.index,
            other.count,
        )

    def __hash__(self) -> int:
        return hash((self.key, self.index, self.count))

    def __repr__(self) -> str:
        return f"Piece({self.key}, {self.index}/{self.count})"


@dataclass
class LayerPlan:
    io_order: list[Task]
    lanes: list[list[Piece]]
    io_end: dict[tuple[int, int], float] = field(default_factory=dict)
    start: dict[tuple[int, int], float] = field(default_factory=dict)
    finish: dict[tuple[int, int], float] = field(default_factory=dict)
    lane_of: dict[tuple[int, int], int] = field(default_factory=dict)
    # plan_layer's totals, taken from the memoised plan of the shape (the same sums in the same order);
    # None: computed from the fields above
    busy: tuple[float, list[float]] | None = field(default=None, repr=False, compare=False)

    @property
    def makespan(self) -> float:
        return max(self.finish.values(), default=0.0)

    @property
    def io_busy(self) -> float:
        if self.busy is not None:
            return self.busy[0]
        return sum(t.io for t in self.io_order)

    @property
    def cpu_busy(self) -> list[float]:
        if self.busy is not None:
            return list(self.busy[1])
        return [sum(t.cpu for t in lane) for lane in self.lanes]


@functools.lru_cache(maxsize=1024)
def pieces_for(decodes: int, workers: int, shards: int = 1) -> int:
    """How many pieces to cut each of a layer's ``decodes`` into so that ``workers`` lanes finish soonest:
    the fewest n (<= ``shards``, <= ``workers``) minimising ceil(decodes * n / workers) / n, the makespan in
    whole decodes of equal pieces dealt over the lanes. 6 decodes on 10 lanes: 5 pieces each (0.6, the
    ideal); 3 on 10: 3 each (0.33 against 0.3); 10 or more: whole experts."""
    if decodes < 1 or workers <= decodes:
        return 1
    best, best_n = 1.0, 1
    for n in range(2, min(shards, workers) + 1):
        span = -(-decodes * n // workers) / n
        if span < best - 1e-12:
            best, best_n = span, n
    return best_n


class Outline(NamedTuple):
    """A layer's plan in task positions, shared by every layer of the same shape (see ``outline_layer``):
    what the scheduler's hot path dispatches from, without making a LayerPlan's objects. Read only."""

    io: list[int]  # task positions in read order
    lanes: list[
        list[tuple[int, int, int, tuple[int, int] | None]]
    ]  # per lane rank: (task, piece, count, part)
    io_busy: float
    rank_busy: list[float]  # decode seconds per lane rank
    makespan: float


def outline_layer(tasks: list[Task], workers: int) -> Outline:
    """The plan of ``tasks`` (see the module docstring) in positions, lanes by rank: rank r is the r-th of the
    caller's lanes in order of preference. O(p) for a layer shaped like one planned before (same costs,
    tokens, pieces and order of keys); ``plan_layer`` gives the same plan as objects. ``part`` is
    ``(piece, count)``, or None for a whole expert."""
    return _outline(_shape(tasks, workers))


def _shape(tasks: list[Task], workers: int) -> tuple:
    """What a layer's plan depends on: the lanes, and per task its costs, tokens, pieces and key rank."""
    n = len(tasks)
    order = sorted(range(n), key=lambda i: tasks[i].key)
    ranks = [0] * n
    for r, i in enumerate(order):
        ranks[i] = r
    return workers, tuple((t.io, t.cpu, t.tokens, t.parts, r) for t, r in zip(tasks, ranks))


@functools.lru_cache(maxsize=4096)
def _outline(shape) -> Outline:
    io_idx, _, lane_plan, spans, io_busy, rank_busy = _planned(shape)
    lanes = [
        [(i, index, count, (index, count) if count > 1 else None) for i, index, count in e] for e in lane_plan
    ]
    return Outline(io_idx, lanes, io_busy, rank_busy, max((end for _, end, _ in spans), default=0.0))


def plan_layer(tasks: list[Task], workers: int, lanes: list[int] | None = None) -> LayerPlan:
    """Plan one layer (see the module docstring) as objects: the read order, each lane's pieces, and when each
    task starts and finishes. Deterministic; O(p log p) in pieces, and O(p) for a layer shaped like one
    planned before (see ``outline_layer``, the same plan in positions). ``lanes``: the lanes in order of
    preference when several are free (default 0..workers-1; the scheduler passes the least loaded first, so
    that over a run every lane gets its share)."""
    if workers < 1:
        raise ValueError("workers must be >= 1")
    if lanes is not None and len(lanes) != workers:
        raise ValueError(f"lanes must order all {workers} lanes, got {len(lanes)}")
    io_idx, io_ends, lane_plan, spans, io_busy, rank_busy = _planned(_shape(tasks, workers))
    prefer = lanes if lanes is not None else list(range(workers))
    made = [_pieces_of(t, max(1, min(t.parts, workers))) if t.cpu > 0 else () for t in tasks]
    by_lane: list = [None] * workers
    cpu_busy = [0] * workers
    for rank, entries in enumerate(lane_plan):
        lane = prefer[rank]
        by_lane[lane] = [made[i][index] for i, index, _ in entries]
        cpu_busy[lane] = rank_busy[rank]
    plan = LayerPlan([tasks[i] for i in io_idx], by_lane, busy=(io_busy, cpu_busy))
    for i, end in zip(io_idx, io_ends):
        plan.io_end[tasks[i].key] = end
    start, finish, lane_of = plan.start, plan.finish, plan.lane_of
    for i, (begin, end, rank) in enumerate(spans):
        key = tasks[i].key
        start[key], finish[key] = begin, end
        lane_of[key] = prefer[rank] if rank >= 0 else -1
    return plan


def _pieces_of(task: Task, count: int) -> tuple[Piece, ...]:
    """The ``count`` pieces of ``task``: shared between plans of equal tasks (pieces are values, never
    changed), since making them was a fifth of what planning a layer cost."""
    try:
        return _cached_pieces(task, count)
    except TypeError:  # a tag that cannot be hashed: make them afresh
        return tuple(Piece(task, i, count) for i in range(count))


@functools.lru_cache(maxsize=16384)
def _cached_pieces(task: Task, count: int) -> tuple[Piece, ...]:
    return tuple(Piece(task, i, count) for i in range(count))


@functools.lru_cache(maxsize=4096)
def _planned(shape):
    """The plan of a layer's shape (see plan_layer) in positions: I/O order and each read's end, per lane
    rank its (task, piece, count) in order, per task (start, finish, lane rank or -1)."""
    workers, tasks = shape
    reads = [i for i, t in enumerate(tasks) if t[0] > 0]
    first = sorted(
        (i for i in reads if tasks[i][0] <= tasks[i][1]), key=lambda i: (tasks[i][0], -tasks[i][2])
    )
    second = sorted(
        (i for i in reads if tasks[i][0] > tasks[i][1]), key=lambda i: (-tasks[i][1], -tasks[i][2])
    )
    io_idx = first + second
    io_end, t = {}, 0.0
    for i in io_idx:
        t += tasks[i][0]
        io_end[i] = t
    spans: list = [None] * len(tasks)
    arrivals = []  # (ready at, -tokens, key rank, task): pieces of a task become ready together
    for i, (_, cpu, tokens, _, rank) in enumerate(tasks):
        ready = io_end.get(i, 0.0)
        if cpu <= 0:  # tasks needing no decode are done when read
            spans[i] = (ready, ready, -1)
            continue
        arrivals.append((ready, -tokens, rank, i))
    arrivals.sort()
    ready_pieces: list = []  # (-tokens, ready at, key rank, index, task, count): the docstring's pick order
    nxt = 0
    free_at = [(0.0, rank) for rank in range(workers)]  # (free at, lane rank): already a heap
    lane_plan: list[list[tuple[int, int, int]]] = [[] for _ in range(workers)]
    begin_of: dict[int, float] = {}
    end_of: dict[int, float] = {}
    lane_at: dict[int, int] = {}
    left = sum(max(1, min(tasks[a[3]][3], workers)) for a in arrivals)
    push, pop = heapq.heappush, heapq.heappop
    while left:
        free, rank = pop(free_at)
        if not ready_pieces and arrivals[nxt][0] > free + 1e-12:
            free = arrivals[nxt][0]  # idle until the next piece is ready
        while nxt < len(arrivals) and arrivals[nxt][0] <= free + 1e-12:
            ready, neg_tokens, krank, i = arrivals[nxt]
            count = max(1, min(tasks[i][3], workers))
            for index in range(count):
                push(ready_pieces, (neg_tokens, ready, krank, index, i, count))
            nxt += 1
        _, ready, _, index, i, count = pop(ready_pieces)
        left -= 1
        begin = free if free > ready else ready
        end = begin + tasks[i][1] / count
        if i not in begin_of or begin < begin_of[i]:
            begin_of[i] = begin
        if end > end_of.get(i, 0.0):
            end_of[i] = end
        lane_at[i] = rank
        lane_plan[rank].append((i, index, count))
        push(free_at, (end, rank))
    for i in begin_of:
        spans[i] = (begin_of[i], end_of[i], lane_at[i])
    io_busy = sum(tasks[i][0] for i in io_idx)  # as LayerPlan.io_busy and .cpu_busy would sum them
    rank_busy = [sum(tasks[i][1] / count for i, _, count in entries) for entries in lane_plan]
    return io_idx, [io_end[i] for i in io_idx], lane_plan, spans, io_busy, rank_busy


def makespan_of(io_order: list[Task], lanes: list[list[Task | Piece]]) -> float:
    """Makespan of a fixed schedule: reads back to back in ``io_order``; each lane runs its tasks (or
    pieces) in order, each starting when the lane is free and its read is done. Used to check plans."""
    t, io_end = 0.0, {}
    for task in io_order:
        t += task.io
        io_end[task.key] = t
    end = 0.0
    for lane in lanes:
        free = 0.0
        for task in lane:
            free = max(free, io_end.get(task.key, 0.0)) + task.cpu
        end = max(end, free)
    for task in io_order:
        if task.cpu <= 0:
            end = max(end, io_end[task.key])
    return end
