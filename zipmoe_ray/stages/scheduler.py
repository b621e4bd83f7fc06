"""Scheduler: the central stage. Owns the cache state, turns each MoE layer's missing experts into read
and decode tasks placed by cache affinity, and tells the executor which full copies to keep or drop.

Life of one request (one per MoE layer that misses; see docs/architecture.md):
  1. account the executor's report: experts it finished with (staging released, unpinned), FULL hits;
  2. classify each missing expert by the form it is held in: COMPRESSED (decode only), SM (read the
     exponent region, decode), DISK (read the extent, decode);
  3. decide where each will be kept (cache admission by aged popularity; victims fall back a form);
  4. reserve staging for the tasks (waves when a prefill's active experts exceed what the budget holds);
  5. plan the I/O lane and the W decode lanes (schedule.layer_schedule), submit the tasks in plan order;
  6. materialise demotions in the background (FULL -> SM by re-splitting the weights on a decode lane,
     FULL -> COMPRESSED by re-reading the extent, COMPRESSED -> SM by copying its SM region);
  7. return handles to the results: the scheduler never fetches a payload itself.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..cache import ExpertCache, Form, Key, ModelLayout, Popularity, SplitRule
from ..cache.popularity import DEFAULT_DECAY, DEFAULT_POPULARITY
from ..errors import BudgetError
from ..runtime.budget import minimum_budget
from ..schedule import CostModel, Task, pieces_for, plan_layer
from ..store import open_store
from .protocol import Delivery, LayerResponse, TaskRunner

__all__ = ["Scheduler", "SchedulerConfig"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig:
    budget: int
    split: SplitRule = field(default_factory=SplitRule)
    popularity: str = DEFAULT_POPULARITY  # lfu (aged token counts) or lru
    decay: float = DEFAULT_DECAY  # per generation step
    recombine_on_device: bool = False
    keep_full_payload: bool = True  # keep a handle to FULL weights (CPU executors): demotion re-splits them
    prior: dict[tuple[int, int], float] | None = None  # popularity prior per expert (a plan's access)
    decode_parts: int | None = None  # lanes one expert's decode may be spread over (None: up to its shards)
    serve_full_payload: bool = False  # FULL experts live in this scheduler's object store (a remote node's)
    reserve_experts: int | None = (
        None  # experts in flight at once (staging reserve); None = the model's top-k
    )


@dataclass
class _Flight:
    staging: int
    form: Form


class Scheduler:
    """Plain class; thread-safe. The Ray backend wraps it in an actor, the local backend calls it directly."""

    def __init__(
        self,
        store_path: str | ModelLayout,
        config: SchedulerConfig,
        runner: TaskRunner,
        costs: CostModel | None = None,
    ):
        """``store_path``: a store directory, or a ModelLayout (the simulator's model, with no store)."""
        layout = (
            store_path
            if isinstance(store_path, ModelLayout)
            else ModelLayout.of_store(open_store(store_path))
        )
        self.config = config
        self.runner = runner
        self.costs = costs or CostModel.nominal()
        self.sizes = layout.sizes
        self.raw_codec = layout.raw_codec
        self.top_k = layout.top_k
        inflight = config.reserve_experts or self.top_k
        self.reserve = minimum_budget(self.sizes, inflight)
        if config.budget < self.reserve:
            raise BudgetError(
                f"memory budget {config.budget:,} B is too small: {inflight} active experts need "
                f"{self.reserve:,} B of buffers in flight; give at least {self.reserve:,} B"
            )
        split = config.split
        if self.raw_codec and (split.compressed or split.sm):
            split = SplitRule(full=1.0, compressed=0.0, sm=0.0)  # a raw store has only the FULL form
        self.split = split
        self.cache = ExpertCache(
            self.sizes,
            config.budget,
            split.capacities(config.budget - self.reserve, sum(s.full for s in self.sizes.values())),
            Popularity(config.decay, config.popularity),
        )
        for key, p in (config.prior or {}).items():
            if key in self.cache.entries and p > 0:
                self.cache.seed(key, p)  # one step's worth of expected use: ranks experts until data arrives
        self._flights: dict[Key, _Flight] = {}
        self._drops: list[Key] = []
        self._lock = threading.RLock()
        self._lane_load = [0.0] * runner.workers
        self.counters = {
            "requests": 0,
            "waves": 0,
            "steps": 0,
            "hits": {f.label: 0 for f in Form if f != Form.DISK},
            "misses": 0,
            "bytes_read_planned": 0,
            "planned_io_s": 0.0,
            "planned_cpu_s": 0.0,
            "planned_makespan_s": 0.0,
            "background_tasks": 0,
        }
        self._t0 = time.monotonic()

    # -- configuration ---------------------------------------------------------------------------------
    def set_costs(self, costs: CostModel) -> None:
        self.costs = costs

    def plan_report(self) -> dict[str, Any]:
        return {
            "rule": self.split.describe(),
            "staging_reserve": self.reserve,
            "capacity": {f.label: c for f, c in self.cache.capacity.items()},
        }

    # -- executor reports --------------------------------------------------------------------------------
    def _release(self, released) -> None:
        for key in released:
            key = tuple(key)
            flight = self._flights.pop(key, None)
            if flight is None:
                continue
            self.cache.release(flight.staging)
            self.cache.unpin(key)

    def _hits(self, layer: int, hits) -> None:
        for e, tokens in hits:
            key = (layer, e)
            form = self.cache.touch(key, tokens)
            self.counters["hits"][Form.FULL.label if form == Form.FULL else form.label] += 1

    def step(self, hits: list[tuple[int, int, int]] = (), released: list[Key] = ()) -> None:
        """End of a generation step: FULL hits the executor served alone ((layer, expert, tokens)), experts
        it finished with; ages popularity by one step."""
        with self._lock:
            self._release(released)
            for layer, e, tokens in hits:
                self.cache.touch((layer, e), tokens)
                self.counters["hits"]["full"] += 1
            self.cache.step()
            self.counters["steps"] += 1

    # -- one layer ------------------------------------------------------------------------------------------
    def _staging(self, key: Key, src: Form) -> tuple[int, int]:
        """(read buffer, decoded output) bytes in flight to make ``key`` usable from form ``src``."""
        s = self.sizes[key]
        if self.raw_codec or src == Form.COMPRESSED:
            return 0, s.full  # raw: the read buffer is the output
        return (s.exp if src == Form.SM else s.extent), s.full

    def request(
        self,
        layer: int,
        misses: list[tuple[int, int]],
        hits: list[tuple[int, int]] = (),
        released: list[Key] = (),
    ) -> LayerResponse:
        """Fetch ``misses`` ((expert, tokens) the executor does not hold in full) of ``layer``. Non-blocking:
        returns handles to results that complete in plan order."""
        with self._lock:
            self.counters["requests"] += 1
            self._release(released)
            self._hits(layer, hits)
            for e, _ in hits:
                self.cache.pin((layer, e))
            try:
                return self._request(layer, misses)
            finally:
                for e, _ in hits:
                    self.cache.unpin((layer, e))

    def _request(self, layer: int, misses) -> LayerResponse:
        pending, served = [], []
        for e, tokens in misses:
            key = (layer, e)
            form = self.cache.form(key)  # touched (a use counted) only when served or fetched, below
            if (
                form == Form.FULL
                and self.config.serve_full_payload
                and self.cache.entries[key].payload is not None
            ):
                self.cache.touch(key, tokens)
                self.counters["hits"]["full"] += 1  # held here in full form: hand out the object, no task
                served.append(Delivery(e, self.cache.entries[key].payload, self._kind(), False, "full"))
                continue
            if form == Form.FULL:  # the executor lost its copy (e.g. restarted): fetch it again
                self.cache.drop(key)
                form = Form.DISK
            pending.append((key, form, tokens))
        pending.sort(key=lambda p: (-p[2], p[0]))
        wave, deferred, staging = [], [], 0
        for key, form, tokens in pending:
            need = sum(self._staging(key, form))
            if deferred or (wave and not self.cache.can_reserve(staging + need)):
                deferred.append((key[1], tokens))
                continue
            wave.append((key, form, tokens))
            staging += need
        if deferred:
            self.counters["waves"] += 1
        for key, form, tokens in wave:  # deferred experts come back in a later request: count them then, once
            self.cache.touch(key, tokens)
            if form == Form.DISK:
                self.counters["misses"] += 1
            else:
                self.counters["hits"][form.label] += 1
        for key, form, _ in wave:
            need = sum(self._staging(key, form))
            self.cache.reserve(need)
            self.cache.pin(key)
            self._flights[key] = _Flight(need, form)
        deliveries = served + self._dispatch(wave)
        drops, self._drops = self._drops, []
        return LayerResponse(layer, deliveries, drops, deferred)

    def _dispatch(self, wave) -> list[Delivery]:
        costs, sizes, entries = self.costs, self.sizes, self.cache.entries
        planes = self.config.recombine_on_device
        workers = self.runner.workers
        decodes = 0 if self.raw_codec else len(wave)
        parts = pieces_for(
            decodes,
            min(workers, self.config.decode_parts or workers),
            min((sizes[k].shards for k, _, _ in wave), default=1),
        )
        tasks = []
        for key, form, tokens in wave:
            s = sizes[key]
            tasks.append(
                Task(key, costs.io_time(s, form), costs.cpu_time(s, form, planes), tokens, form, parts)
            )
        lanes = sorted(range(workers), key=self._lane_load.__getitem__)  # least loaded first
        plan = plan_layer(tasks, workers, lanes)
        busy = plan.cpu_busy
        c = self.counters
        c["planned_io_s"] += plan.io_busy
        c["planned_cpu_s"] += sum(busy)
        c["planned_makespan_s"] += plan.makespan
        for lane, b in enumerate(busy):
            self._lane_load[lane] += b
        regions: dict[Key, tuple[Any, Any]] = {}  # (E region, SM region) handles per expert
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
        outputs: dict[Key, list[Any]] = {}
        for lane, pieces in enumerate(plan.lanes):  # decodes, per lane in plan order
            if not pieces:
                continue
            jobs = [
                (p.key, *regions[p.key], planes, (p.index, p.count) if p.count > 1 else None) for p in pieces
            ]
            for p, h in zip(pieces, runner.decode_lane(lane, jobs)):
                outputs.setdefault(p.key, [None] * p.count)[p.index] = h
        kind = self._kind()
        deliveries = []
        for t in tasks:
            handles = [regions[t.key][1]] if self.raw_codec else outputs[t.key]
            one = len(handles) == 1
            final = self._admit(t.key, t.tag, regions[t.key], handles[0] if one else None)
            deliveries.append(
                Delivery(
                    t.key[1], handles[0], kind, final == Form.FULL, t.tag.label, None if one else handles
                )
            )
        return deliveries

    def _kind(self) -> str:
        """What a fetched expert's output is (and a kept full payload therefore holds): see Delivery."""
        return "raw" if self.raw_codec else ("planes" if self.config.recombine_on_device else "words")

    def _least_loaded_lane(self) -> int:
        return min(range(len(self._lane_load)), key=self._lane_load.__getitem__)

    def _admit(self, key: Key, src: Form, parts: tuple[Any, Any], output: Any) -> Form:
        """Place a just-fetched expert in the best form it earns now (see ExpertCache.admit), turn the
        staging that became cached bytes into held bytes, and materialise the victims' new forms. Host
        forms are sets of region objects (COMPRESSED = E + SM, SM = SM), so no bytes are copied here."""
        allowed = (Form.FULL,) if self.raw_codec else (Form.FULL, Form.COMPRESSED, Form.SM)
        target = self.cache.choose(key, allowed)
        if target == src or target == Form.DISK:
            return src
        s = self.sizes[key]
        read_bytes, out_bytes = self._staging(key, src)
        if target == Form.FULL:
            moved = out_bytes
            payload = (
                output if self.config.keep_full_payload and not self.config.recombine_on_device else None
            )
        elif target == Form.COMPRESSED:
            moved = read_bytes  # the regions just read are kept
            payload = parts
        else:  # SM, from a disk read: keep its SM region
            moved = s.sm
            payload = parts[1]
        flight = self._flights.get(key)
        if moved and flight is not None:
            self.cache.release(moved)
            flight.staging -= moved
        final, demotions = self.cache.admit(key, target, payload)
        for d in demotions:
            self._demote(d)
        if final != target and moved and flight is not None:
            self.cache.reserve(moved)  # it stays transient after all
            flight.staging += moved
        return final

    def _demote(self, d) -> None:
        """Give a victim its new, cheaper form: COMPRESSED -> SM drops the E region; FULL re-splits its
        weights on a decode lane (SM) and re-reads only the E region (COMPRESSED); no host copy otherwise."""
        if d.src == Form.FULL:
            self._drops.append(d.key)
        if d.dst == Form.DISK:
            return
        if d.src == Form.COMPRESSED:  # -> SM
            self.cache.set_payload(d.key, d.payload[1])
            return
        self.counters["background_tasks"] += 1
        lane = self._least_loaded_lane()
        words = d.payload  # FULL weights (CPU executors keep a handle), or None
        sm = (
            self.runner.derive(lane, d.key, words, "raw")
            if words is not None
            else self.runner.read(d.key, "raw")
        )
        self.cache.set_payload(d.key, sm if d.dst == Form.SM else (self.runner.read(d.key, "exp"), sm))

    # -- reporting ---------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        with self._lock:
            c = dict(self.counters)
            hits = dict(c["hits"])
            total = sum(hits.values()) + c["misses"]
            c["hits"] = hits
            c["accesses"] = total
            c["hit_rate"] = {k: (v / total if total else 0.0) for k, v in hits.items()}
            c["miss_rate"] = c["misses"] / total if total else 0.0
            c["cache"] = self.cache.report()
            c["plan"] = self.plan_report()
            c["costs"] = self.costs.to_dict()
            c["uptime_s"] = time.monotonic() - self._t0
            return c

    def reset_stats(self) -> None:
        with self._lock:
            for k, v in self.counters.items():
                if isinstance(v, dict):
                    for kk in v:
                        v[kk] = 0
                else:
                    self.counters[k] = 0 if isinstance(v, int) else 0.0
            self.cache.peak = self.cache.total
            self._t0 = time.monotonic()

    def ping(self) -> bool:
        return True
