"""The simulator's hot paths as they were before they were made fast (plain, obviously-right versions):
the reference tests/test_sim_reference.py replays every policy through, to show the fast ones give
exactly the same results. Each mirrors the function it stands for line by line, without its shortcuts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zipmoe_ray.cache.forms import Form
from zipmoe_ray.schedule import layer_schedule as ls
from zipmoe_ray.sim.runner import SimRunner
from zipmoe_ray.stages.protocol import Delivery

from .reference_cache import ScanningCache


@dataclass(frozen=True)
class RefHandle:
    ready: float


def ref_ready_time(x) -> float:
    if x is None:
        return 0.0
    if isinstance(x, RefHandle):
        return x.ready
    if isinstance(x, (tuple, list)):
        return max((ref_ready_time(y) for y in x), default=0.0)
    raise TypeError(f"not a simulated result: {type(x).__name__}")


class RefRunner(SimRunner):
    """SimRunner with every task timed one by one through max() and frozen handles."""

    def read(self, key, part):
        s = self.sizes[key]
        nbytes = {"exp": s.exp, "raw": s.sm, "all": s.extent}[part]
        start = max(self.now, self.io_free)
        dt = self.costs.read_latency + nbytes / self.costs.read_bps
        self.io_free = start + dt
        self.io_busy += dt
        self.bytes_read += nbytes
        return RefHandle(start + dt)

    def _lane(self, lane, ready, dt):
        start = max(self.lane_free[lane], ready, self.now)
        self.lane_free[lane] = start + dt
        self.cpu_busy[lane] += dt
        return RefHandle(start + dt)

    def decode_lane(self, lane, jobs):
        free = max(self.lane_free[lane], self.now)
        busy, out = 0.0, []
        for key, exp, sm, planes_only, part in jobs:
            dt = self.sizes[key].full / (
                self.costs.decompress_bps if (planes_only or self.on_device) else self.costs.decode_bps
            )
            if part is not None:
                dt /= part[1]
            start = max(free, ref_ready_time(exp), ref_ready_time(sm))
            free = start + dt
            busy += dt
            out.append(RefHandle(free))
        self.lane_free[lane] = free
        self.cpu_busy[lane] += busy
        return out

    def derive(self, lane, key, words, part):
        return self._lane(lane, ref_ready_time(words), self.sizes[key].full / self.costs.copy_bps)


class RefCache(ScanningCache):
    """The cache with victims found by a scan and its held bytes summed on every look."""

    @property
    def held(self) -> int:
        return sum(self.used.values())

    @property
    def total(self) -> int:
        return self.held + self.staging

    def _fits(self, form, nbytes, freed=0):
        return (
            self.used[form] - freed + nbytes <= self.capacity[form]
            and self.total - freed + nbytes <= self.budget
        )

    def can_reserve(self, nbytes):
        return self.total + nbytes <= self.budget


def ref_plan_layer(tasks, workers, lanes=None):
    """plan_layer without the memo: the layer's plan searched afresh, pieces made afresh, totals summed."""
    n = len(tasks)
    order = sorted(range(n), key=lambda i: tasks[i].key)
    ranks = [0] * n
    for r, i in enumerate(order):
        ranks[i] = r
    shape = (workers, tuple((t.io, t.cpu, t.tokens, t.parts, r) for t, r in zip(tasks, ranks)))
    io_idx, io_ends, lane_plan, spans, _, _ = ls._planned.__wrapped__(shape)
    prefer = lanes if lanes is not None else list(range(workers))
    plan = ls.LayerPlan(io_order=[tasks[i] for i in io_idx], lanes=[[] for _ in range(workers)])
    for i, end in zip(io_idx, io_ends):
        plan.io_end[tasks[i].key] = end
    for rank, entries in enumerate(lane_plan):
        plan.lanes[prefer[rank]] = [ls.Piece(tasks[i], index, count) for i, index, count in entries]
    for i, (begin, end, rank) in enumerate(spans):
        key = tasks[i].key
        plan.start[key], plan.finish[key] = begin, end
        plan.lane_of[key] = prefer[rank] if rank >= 0 else -1
    return plan


def ref_dispatch(self, wave):
    """Placement._dispatch as first written: a LayerPlan of objects (ref_plan_layer), costs asked per task."""
    costs, sizes, entries = self.costs, self.sizes, self.cache.entries
    planes = self.config.recombine_on_device
    workers = self.runner.workers
    decodes = 0 if self.raw_codec else len(wave)
    parts = ls.pieces_for(
        decodes,
        min(workers, self.config.decode_parts or workers),
        min((sizes[k].shards for k, _, _ in wave), default=1),
    )
    tasks = []
    for key, form, tokens in wave:
        s = sizes[key]
        tasks.append(
            ls.Task(key, costs.io_time(s, form), costs.cpu_time(s, form, planes), tokens, form, parts)
        )
    lanes = sorted(range(workers), key=self._lane_load.__getitem__)  # least loaded first
    plan = ref_plan_layer(tasks, workers, lanes)
    busy = plan.cpu_busy
    c = self.counters
    c["planned_io_s"] += plan.io_busy
    c["planned_cpu_s"] += sum(busy)
    c["planned_makespan_s"] += plan.makespan
    for lane, b in enumerate(busy):
        self._lane_load[lane] += b
    regions: dict[Any, tuple[Any, Any]] = {}  # (E region, SM region) handles per expert
    for t in tasks:  # what is already in memory
        if t.tag == Form.COMPRESSED:
            regions[t.key] = entries[t.key].payload
        elif t.tag == Form.SM:
            regions[t.key] = (None, entries[t.key].payload)
    runner = self.runner
    for t in plan.io_order:  # reads, in plan order
        c["bytes_read_planned"] += sizes[t.key].read(t.tag)
        if self.raw_codec:
            regions[t.key] = (None, runner.read(t.key, "all"))
        elif t.tag == Form.SM:
            regions[t.key] = (runner.read(t.key, "exp"), regions[t.key][1])
        else:
            regions[t.key] = runner.read_split(t.key)
    outputs: dict[Any, list[Any]] = {}
    for lane, pieces in enumerate(plan.lanes):  # decodes, per lane in plan order
        if not pieces:
            continue
        jobs = [(p.key, *regions[p.key], planes, (p.index, p.count) if p.count > 1 else None) for p in pieces]
        for p, h in zip(pieces, runner.decode_lane(lane, jobs)):
            outputs.setdefault(p.key, [None] * p.count)[p.index] = h
    kind = self._kind()
    deliveries = []
    for t in tasks:
        handles = [regions[t.key][1]] if self.raw_codec else outputs[t.key]
        one = len(handles) == 1
        final = self._admit(t.key, t.tag, regions[t.key], handles[0] if one else None)
        d = Delivery(t.key[1], handles[0], kind, final == Form.FULL, t.tag.label, None if one else handles)
        self._flights[t.key].delivery = d
        deliveries.append(d)
    return deliveries


def ref_executor_layer(
    sched,
    runner,
    layer,
    picks,
    t,
    sizes,
    exec_bps,
    overhead,
    released,
    notes,
    handoff=0.0,
    ahead=None,
    waits=None,
):
    """sim.simulator.executor_layer as first written (no recorded predictions to replay)."""
    assert ahead is None
    hits = [(e, tok) for e, tok in picks if sched.cache.form((layer, e)) == Form.FULL]
    misses = [(e, tok) for e, tok in picks if sched.cache.form((layer, e)) != Form.FULL]
    t_exec, busy = t, 0.0
    for e, _ in hits:
        dt = sizes[(layer, e)].full / exec_bps
        t_exec += dt
        busy += dt
    if not misses:
        notes.extend((layer, e, tok) for e, tok in hits)
        return t_exec, busy, released
    t_call = t + overhead
    runner.now = t_call
    resp = sched.request(layer, misses, hits, released)
    released = []
    if waits is not None:
        waits[0] += max(0.0, t_call - t_exec)
    t_exec = max(t_exec, t_call)
    waiting = [(ref_ready_time(d.handle if d.parts is None else d.parts), d.expert) for d in resp.deliveries]
    deferred, answer = resp.deferred, None  # deferred experts are asked for again after each computed one

    def take():
        nonlocal t_exec, answer, deferred
        t_ans, got = answer
        answer = None
        if waits is not None:
            waits[0] += max(0.0, t_ans - t_exec)
        t_exec = max(t_exec, t_ans)
        waiting.extend(
            (ref_ready_time(d.handle if d.parts is None else d.parts), d.expert) for d in got.deliveries
        )
        deferred = got.deferred

    def ask():
        nonlocal answer, released, deferred
        runner.now = t_exec + overhead
        answer = (runner.now, sched.request(layer, deferred, [], released))
        released, deferred = [], []

    while waiting or deferred or answer is not None:
        if not waiting:
            idle = answer is None
            if idle:
                ask()
            take()
            assert not (idle and deferred and not waiting), "deferred everything with nothing in flight"
            continue
        i = min(range(len(waiting)), key=lambda i: waiting[i][0])
        r, e = waiting.pop(i)
        dt = sizes[(layer, e)].full / exec_bps
        if waits is not None:
            waits[1] += max(0.0, r - t_exec)
        t_exec = max(t_exec, r) + handoff + dt
        busy += dt
        released.append((layer, e))
        if answer is not None:
            take()
        if deferred:
            ask()
    return t_exec, busy, released
