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
from ..schedule import CostModel
from ..schedule.split_tuner import SplitTuner, wide_batch
from .placement import Placement
from .protocol import Delivery, LayerResponse, TaskRunner

__all__ = ["Scheduler", "SchedulerConfig"]

log = logging.getLogger(__name__)

# generation steps without a prefetch after which the staging set aside for prefetch goes back to the cache
ASIDE_QUIET_STEPS = 8


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
    replan_every: int = (
        0  # decode steps between online re-plans of the split (schedule/split_tuner.py); 0: off
    )


@dataclass
class _Flight:
    staging: int
    form: Form
    delivery: Delivery | None = None  # the handles handed out (a second request for the key gets the same)
    prefetched: bool = False  # fetched ahead of its layer's routing
    used: bool = False  # and since used by the executor


class Scheduler(Placement):
    """Plain class; thread-safe. The Ray backend wraps it in an actor, the local backend calls it directly."""

    def __init__(
        self,
        store_path: str | ModelLayout,
        config: SchedulerConfig,
        runner: TaskRunner,
        costs: CostModel | None = None,
    ):
        """``store_path``: a store directory, or a ModelLayout (the simulator's model, with no store)."""
        if isinstance(store_path, ModelLayout):
            layout = store_path
        else:  # imported here: the store's reader pulls in torch, which the simulator never needs
            from ..store import open_store

            layout = ModelLayout.of_store(open_store(store_path))
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
        # Prefetch staging. While prefetches arrive (the executor's precision gate is open), the cache
        # gives up a second layer's staging (``aside``), unless the budget is too small to spare it (then
        # nothing is fetched ahead); some steps after they stop, the cache takes it back, so that a workload
        # whose routing cannot be predicted pays nothing for prediction.
        ahead = minimum_budget(self.sizes, self.top_k)
        self._aside_bytes = ahead if config.budget - self.reserve >= 2 * ahead else 0
        self.aside = 0  # set aside now (0 or _aside_bytes)
        self._quiet_steps = 0  # generation steps since the last prefetch
        self.split, capacity = self._capacities(config.split)
        self.cache = ExpertCache(
            self.sizes, config.budget, capacity, Popularity(config.decay, config.popularity)
        )
        # online re-planning times the start-up plan against classic offloading (full experts only) in the
        # cache's own order; the order is not a candidate of its own (the default, a short LFU memory, ranks
        # well at batch 1 and batch 8: cache/popularity.py)
        full_only = SplitRule.for_policy("full-only")
        self.tuner = (
            SplitTuner(
                [("start-up plan", self.split), ("full-only", full_only)],
                every=config.replan_every,
                wide_from=self._wide_from(full_only),
            )
            if config.replan_every and self.split != full_only
            else None
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
            "waves": 0,  # requests that had to defer some of their experts
            "steps": 0,
            "hits": {f.label: 0 for f in Form if f != Form.DISK},
            "misses": 0,
            "bytes_read_planned": 0,
            "planned_io_s": 0.0,
            "planned_cpu_s": 0.0,
            "planned_makespan_s": 0.0,
            "background_tasks": 0,
            "prefetch_issued": 0,  # experts fetched ahead of their layer's routing
            "prefetch_used": 0,  # of those, the ones the executor used
            "prefetch_bytes_read": 0,  # bytes read for prefetched experts (used or not)
            "prefetch_wasted_bytes": 0,  # bytes read for prefetched experts never used
        }
        self._t0 = time.monotonic()

    # -- configuration ---------------------------------------------------------------------------------
    def set_costs(self, costs: CostModel) -> None:
        self.costs = costs

    def _capacities(self, split: SplitRule) -> dict:
        if self.raw_codec and (split.compressed or split.sm):
            split = SplitRule(full=1.0, compressed=0.0, sm=0.0)  # a raw store has only the FULL form
        total = sum(s.full for s in self.sizes.values())
        return split, split.capacities(self.config.budget - self.reserve - self.aside, total)

    def _wide_from(self, full_only: SplitRule) -> int | None:
        """The smallest batch size whose step routes to more distinct experts of a layer than full-only's
        cache holds of it (schedule/split_tuner.py, wide_batch), from the mean layer of this store."""
        layers = {k[0] for k in self.sizes}
        mean_full = sum(s.full for s in self.sizes.values()) / len(self.sizes)
        held = self._capacities(full_only)[1][Form.FULL] / mean_full / len(layers)
        return wide_batch(len(self.sizes) / len(layers), self.top_k, held)

    def _set_aside(self, nbytes: int) -> None:
        """Resize the forms for ``nbytes`` of prefetch staging set aside (demotions as for a re-plan)."""
        if nbytes != self.aside:
            self.aside = nbytes
            self.set_split(self.split)

    def set_split(self, split: SplitRule) -> None:
        """Re-plan the split between forms while running: experts over a form's new capacity fall back to
        cheaper forms (demotions materialised as at admission); experts in flight keep their staging.
        Does not block."""
        with self._lock:
            self.split, capacity = self._capacities(split)
            for d in self.cache.resize(capacity):
                self._demote(d)

    def plan_report(self) -> dict[str, Any]:
        return {
            "rule": self.split.describe(),
            "popularity": self.cache.popularity.kind,
            "staging_reserve": self.reserve,
            "prefetch_aside": self.aside,
            "capacity": {f.label: c for f, c in self.cache.capacity.items()},
        }

    # -- executor reports --------------------------------------------------------------------------------
    def _release(self, released) -> None:
        for key in released:
            key = tuple(key)
            flight = self._flights.pop(key, None)
            if flight is None:
                continue
            if flight.prefetched and not flight.used:
                self.counters["prefetch_wasted_bytes"] += self.sizes[key].read(flight.form)
            self.cache.release(flight.staging)
            self.cache.unpin(key)
        self._shed()

    def _shed(self) -> None:
        """Experts a resize left over their form's capacity, because they were pinned, fall back now."""
        for d in self.cache.shed():
            self._demote(d)

    def _hits(self, layer: int, hits) -> None:
        # the executor served these from its FULL copies: a FULL hit even where the cache has demoted the
        # expert since (a re-planned split's drop reaches the executor with this request's answer)
        for e, tokens in hits:
            self.cache.touch((layer, e), tokens)
            self.counters["hits"][Form.FULL.label] += 1

    def release(self, released: list[Key] = (), used: list[tuple[int, int, int]] = ()) -> None:
        """Between steps: prefetched experts the executor used, experts it finished with. Does not block."""
        with self._lock:
            self._used(used)
            self._release(released)

    def _used(self, used) -> None:
        """Prefetched experts the executor really used ((layer, expert, tokens)): their use counts now, as a
        hit in the form they were fetched from (a miss if from disk)."""
        for layer, e, tokens in used:
            key = (layer, e)
            flight = self._flights.get(key)
            self.cache.touch(key, tokens)
            form = flight.form if flight is not None else Form.DISK
            if flight is not None:
                flight.used = True
            if form == Form.DISK:
                self.counters["misses"] += 1
            else:
                self.counters["hits"][form.label] += 1
            self.counters["prefetch_used"] += 1

    def steps(self, reports: list[tuple]) -> None:
        """Several steps' reports, in order, each ``(hits, released, used, timing)`` as :meth:`step` takes
        them (the executor sends a run of steps without requests in one message). Does not block."""
        for r in reports:
            self.step(*r)

    def step(
        self,
        hits: list[tuple[int, int, int]] = (),
        released: list[Key] = (),
        used: list[tuple[int, int, int]] = (),
        timing: tuple[float, int] | None = None,
    ) -> None:
        """End of a generation step: FULL hits the executor served alone ((layer, expert, tokens)), experts
        it finished with, prefetched experts it used, and for a decode step its (seconds, rows), which the
        online re-planning compares; ages popularity by one step. Does not block."""
        with self._lock:
            if timing is not None and self.tuner is not None:
                choice = self.tuner.observe(float(timing[0]), int(timing[1]))
                if choice is not None:
                    t = self.tuner
                    log.info(
                        "online re-plan: %s (%s; last round's median decode step: %s)",
                        t.name,
                        choice.describe(),
                        ", ".join(f"{n} {s * 1e3:.0f} ms" for n, s in t.scores.items()) or "timing",
                    )
                    self.set_split(choice)
            self._used(used)
            self._release(released)
            for layer, e, tokens in hits:
                self.cache.touch((layer, e), tokens)
                self.counters["hits"]["full"] += 1
            self.cache.step()
            self.counters["steps"] += 1
            self._quiet_steps += 1
            if self.aside and self._quiet_steps > ASIDE_QUIET_STEPS:
                self._set_aside(0)  # prefetches stopped (the gate shut): the cache takes the bytes back

    def prefetch(
        self,
        layer: int,
        picks: list[tuple[int, int]],
        released: list[Key] = (),
        used: list[tuple[int, int, int]] = (),
    ) -> LayerResponse:
        """Start fetching ``picks`` ((expert, tokens) predicted for ``layer``, none of them held in FULL form
        by the executor) ahead of the layer's routing. Nothing is counted as used until a later call names
        the expert in ``used`` (this one included, for earlier prefetches: uses are counted before
        ``released`` lets their flights go); what is never used is ``released`` like any fetch, its
        admission decided by the ordinary rules. Only what fits the staging the cache gives up while
        prefetches arrive (``aside``; none on a budget too small to spare it) is fetched, so that a request
        never finds its reserve taken, and nothing already in flight. Returns handles at once, like
        ``request``."""
        with self._lock:
            self._used(used)
            self._release(released)
            self._quiet_steps = 0
            self._set_aside(self._aside_bytes)
            wave, staging = [], 0
            room = self._prefetch_room()
            for e, tokens in sorted(picks, key=lambda p: (-p[1], p[0])):
                key = (layer, e)
                form = self.cache.form(key)
                if key in self._flights or form == Form.FULL:
                    continue
                need = sum(self._staging(key, form))
                if staging + need > room or not self.cache.can_reserve(staging + need):
                    break
                wave.append((key, form, tokens))
                staging += need
            for key, form, _ in wave:
                need = sum(self._staging(key, form))
                self.cache.reserve(need)
                self.cache.pin(key)
                self._flights[key] = _Flight(need, form, prefetched=True)
            self.counters["prefetch_issued"] += len(wave)
            self.counters["prefetch_bytes_read"] += sum(self.sizes[k].read(f) for k, f, _ in wave)
            deliveries = self._dispatch(wave) if wave else []
            drops, self._drops = self._drops, []
            return LayerResponse(layer, deliveries, drops, [])

    def _prefetch_room(self) -> int:
        """Staging bytes a prefetch may take now: the aside, less what prefetched experts not yet used hold.
        Requests keep the reserve: it is never lent, because a request's first fetch relies on it."""
        held = sum(f.staging for f in self._flights.values() if f.prefetched and not f.used)
        return self.aside - held

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
        used: list[tuple[int, int, int]] = (),
    ) -> LayerResponse:
        """Fetch ``misses`` ((expert, tokens) the executor does not hold in full) of ``layer``; ``used``:
        prefetched experts it used since its last report (see prefetch). Non-blocking: returns handles to
        results that complete in plan order."""
        with self._lock:
            self.counters["requests"] += 1
            self._used(used)
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
            flight = self._flights.get(key)
            if flight is not None and flight.delivery is not None:  # on its way already (prefetched)
                self._used([(layer, e, tokens)])
                served.append(flight.delivery)
                continue
            if form == Form.FULL:  # the executor lost its copy (e.g. restarted): fetch it again
                self.cache.drop(key)
                form = Form.DISK
            pending.append((key, form, tokens))
        pending.sort(key=lambda p: (-p[2], p[0]))
        wave, deferred, staging = [], [], 0
        # the first fetch always fits the reserve, unless experts of this layer hold some of it: prefetched
        # ones handed out now, or, for a request of experts deferred earlier (sent as soon as one of the
        # layer's experts is released), those requested before it and not yet released; then only what fits
        # goes now, and the rest when they are released
        holding = any(self._flights.get((layer, d.expert)) is not None for d in served) or any(
            k[0] == layer and not f.prefetched for k, f in self._flights.items()
        )
        for key, form, tokens in pending:
            need = sum(self._staging(key, form))
            if deferred or ((wave or holding) and not self.cache.can_reserve(staging + need)):
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
            c["replan"] = self.tuner.report() if self.tuner is not None else None
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
