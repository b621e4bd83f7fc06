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

import heapq
from dataclasses import dataclass, field

__all__ = ["LayerPlan", "Piece", "Task", "makespan_of", "pieces_for", "plan_layer"]


@dataclass(frozen=True)
class Task:
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

    @property
    def makespan(self) -> float:
        return max(self.finish.values(), default=0.0)

    @property
    def io_busy(self) -> float:
        return sum(t.io for t in self.io_order)

    @property
    def cpu_busy(self) -> list[float]:
        return [sum(t.cpu for t in lane) for lane in self.lanes]


def _io_order(tasks: list[Task]) -> list[Task]:
    reads = [t for t in tasks if t.io > 0]
    first = sorted((t for t in reads if t.io <= t.cpu), key=lambda t: (t.io, -t.tokens))
    second = sorted((t for t in reads if t.io > t.cpu), key=lambda t: (-t.cpu, -t.tokens))
    return first + second


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


def plan_layer(tasks: list[Task], workers: int, lanes: list[int] | None = None) -> LayerPlan:
    """Plan one layer (see the module docstring). Deterministic; O(p log p) in pieces. ``lanes``: the lanes
    in order of preference when several are free (default 0..workers-1; the scheduler passes the least
    loaded first, so that over a run every lane gets its share)."""
    if workers < 1:
        raise ValueError("workers must be >= 1")
    order = _io_order(tasks)
    plan = LayerPlan(io_order=order, lanes=[[] for _ in range(workers)])
    t = 0.0
    io_end = plan.io_end
    for task in order:
        t += task.io
        io_end[task.key] = t
    start, finish, lane_of = plan.start, plan.finish, plan.lane_of
    arrivals = []  # (ready at, -tokens, key, task): pieces of a task become ready together
    for task in tasks:
        ready = io_end.get(task.key, 0.0)
        if task.cpu <= 0:  # tasks needing no decode are done when read
            start[task.key] = finish[task.key] = ready
            lane_of[task.key] = -1
            continue
        arrivals.append((ready, -task.tokens, task.key, task))
    arrivals.sort(key=lambda a: a[:3])
    ready_pieces: list = []  # (-tokens, ready at, key, index, piece): the pick order of the docstring
    nxt = 0
    prefer = lanes if lanes is not None else list(range(workers))
    free_at = [(0.0, rank) for rank in range(workers)]  # (free at, rank in ``prefer``): already a heap
    left = sum(max(1, min(a[3].parts, workers)) for a in arrivals)
    while left:
        free, rank = heapq.heappop(free_at)
        lane = prefer[rank]
        if not ready_pieces and arrivals[nxt][0] > free + 1e-12:
            free = arrivals[nxt][0]  # idle until the next piece is ready
        while nxt < len(arrivals) and arrivals[nxt][0] <= free + 1e-12:
            ready, neg_tokens, key, task = arrivals[nxt]
            n = max(1, min(task.parts, workers))
            for i in range(n):
                heapq.heappush(ready_pieces, (neg_tokens, ready, key, i, Piece(task, i, n)))
            nxt += 1
        _, ready, key, _, pick = heapq.heappop(ready_pieces)
        left -= 1
        begin = free if free > ready else ready
        end = begin + pick.cpu
        if key not in start or begin < start[key]:
            start[key] = begin
        if end > finish.get(key, 0.0):
            finish[key] = end
        lane_of[key] = lane
        plan.lanes[lane].append(pick)
        heapq.heappush(free_at, (end, rank))
    return plan


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
