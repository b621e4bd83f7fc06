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
     while reads run, so the I/O lane and the decode lanes finish together.

Guarantee: makespan <= (3 - 1/W) * OPT. Proof (with pieces as tasks; cutting decodes into pieces can only
lower OPT, so the bound also holds against the optimum of uncut tasks): OPT >= A := sum_j a_j (one I/O
lane), OPT >= sum_j b_j / W (W decode lanes), OPT >= max_j b_j. Let k be the task that finishes last and s_k its start. All reads end by
A, so every task is ready from A on; in [A, s_k) no lane idles while k waits, so those lanes work on other
tasks: s_k - A <= (sum_j b_j - b_k) / W. Hence C_max = s_k + b_k <= A + sum_j b_j / W + (1 - 1/W) b_k
<= (3 - 1/W) OPT. The bound needs only that the I/O lane never idles and the decode lanes are non-delay,
so it holds for any priority order; the orders above are what make the typical case close to OPT
(tests/test_layer_schedule.py compares against brute-force optima on random instances).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

__all__ = ["LayerPlan", "Piece", "Task", "makespan_of", "plan_layer"]


@dataclass(frozen=True)
class Task:
    key: tuple[int, int]
    io: float  # seconds on the I/O lane (0: no read)
    cpu: float  # seconds on a decode lane (0: no decode), for the whole expert
    tokens: int = 1
    tag: object = None  # caller data (form, sizes, ...)
    parts: int = 1  # pieces the decode may be cut into (<= its shards)


@dataclass(frozen=True)
class Piece:
    task: Task
    index: int  # 0..count-1
    count: int

    @property
    def key(self) -> tuple[int, int]:
        return self.task.key

    @property
    def cpu(self) -> float:
        return self.task.cpu / self.count

    @property
    def tokens(self) -> int:
        return self.task.tokens


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


def plan_layer(tasks: list[Task], workers: int) -> LayerPlan:
    """Plan one layer (see the module docstring). Deterministic; O(n log n) in pieces."""
    if workers < 1:
        raise ValueError("workers must be >= 1")
    order = _io_order(tasks)
    plan = LayerPlan(io_order=order, lanes=[[] for _ in range(workers)])
    t = 0.0
    for task in order:
        t += task.io
        plan.io_end[task.key] = t
    ready_at = {task.key: plan.io_end.get(task.key, 0.0) for task in tasks}
    waiting: list[Piece] = []
    for task in tasks:
        if task.cpu <= 0:  # tasks needing no decode are done when read
            plan.start[task.key] = plan.finish[task.key] = ready_at[task.key]
            plan.lane_of[task.key] = -1
            continue
        n = max(1, min(task.parts, workers))
        waiting += [Piece(task, i, n) for i in range(n)]
    waiting.sort(key=lambda x: (ready_at[x.key], -x.tokens))
    lanes = [(0.0, i) for i in range(workers)]  # (free at, lane)
    heapq.heapify(lanes)
    while waiting:
        free, lane = heapq.heappop(lanes)
        ready = [x for x in waiting if ready_at[x.key] <= free + 1e-12]
        if not ready:  # idle until the next piece is ready
            free = min(ready_at[x.key] for x in waiting)
            ready = [x for x in waiting if ready_at[x.key] <= free + 1e-12]
        pick = min(ready, key=lambda x: (-x.tokens, ready_at[x.key], x.key, x.index))
        waiting.remove(pick)
        start = max(free, ready_at[pick.key])
        end = start + pick.cpu
        plan.start[pick.key] = min(plan.start.get(pick.key, start), start)
        plan.finish[pick.key] = max(plan.finish.get(pick.key, 0.0), end)
        plan.lane_of[pick.key] = lane
        plan.lanes[lane].append(pick)
        heapq.heappush(lanes, (end, lane))
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
