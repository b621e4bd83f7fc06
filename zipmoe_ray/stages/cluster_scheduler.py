"""ClusterScheduler: the central scheduler of a model served across several devices.

Every expert has a *home* node; each node has its own budget, cache (a Scheduler with that node's loader
and decompressors as its lanes), and, but for the executor's node, an ExpertHost. A layer's request is
split by home: experts homed on the executor's node are fetched as on one device; experts homed elsewhere
are read, decoded and kept on their node, and the executor sends them its hidden states instead (a
delivery tagged with the node). Homes are interleaved so that every node holds its share of every layer,
and the cluster as a whole caches as many experts as all budgets together hold.

Faults: ``node_failed(name)`` (the executor calls it when a node's results error out or do not arrive in
time) re-homes that node's experts over the nodes left, round robin, with their cache state dropped; the
layer is then requested again. Stores are full copies on every node, so any node can take any expert.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, replace
from typing import Any

from ..cache import Key, ModelLayout
from .protocol import LayerResponse
from .scheduler import Scheduler, SchedulerConfig

__all__ = ["ClusterScheduler", "NodeSetup", "home_index", "remote_node_config"]


def remote_node_config(cfg: SchedulerConfig) -> SchedulerConfig:
    """A node other than the executor's keeps full experts as objects and serves them to its ExpertHost."""
    return replace(
        cfg, serve_full_payload=True, keep_full_payload=True, recombine_on_device=False, decode_parts=1
    )


def home_index(key: tuple[int, int], nodes: int) -> int:
    """The initial home of an expert among ``nodes``: interleaved, so every node holds its share of every
    layer."""
    return (key[0] + key[1]) % nodes


log = logging.getLogger(__name__)


@dataclass
class NodeSetup:
    name: str
    budget: int
    runner: Any  # TaskRunner over this node's loader and decompressors
    executor: bool = False  # the node the executor runs on
    inflight: int | None = None  # experts this node stages at once (its share of a layer's top-k)


class ClusterScheduler:
    """Plain class; runs as the Scheduler actor of a cluster engine."""

    def __init__(self, store_path: str, config: SchedulerConfig, nodes: list[NodeSetup], costs=None):
        from ..store import open_store

        store = open_store(store_path)
        self.layout = ModelLayout.of_store(store)
        self.costs = costs
        self.nodes: dict[str, Scheduler] = {}
        self.executor_node = next(n.name for n in nodes if n.executor)
        for n in nodes:
            cfg = replace(config, budget=n.budget, reserve_experts=n.inflight)
            if not n.executor:
                cfg = remote_node_config(cfg)
            self.nodes[n.name] = Scheduler(self.layout, cfg, n.runner, costs)
        self.alive = [n.name for n in nodes]
        self.home: dict[Key, str] = {}
        for key in sorted(self.layout.sizes):
            self.home[key] = self.alive[home_index(key, len(self.alive))]
        self.failed: list[str] = []
        self._lock = threading.RLock()

    def set_costs(self, costs) -> None:
        self.costs = costs
        for s in self.nodes.values():
            s.set_costs(costs)

    def _split(self, layer: int, items):
        by: dict[str, list] = {}
        for e, t in items:
            by.setdefault(self.home[(layer, e)], []).append((e, t))
        return by

    def _by_home(self, keyed, key_of) -> dict[str, list]:
        by: dict[str, list] = {}
        for item in keyed:
            by.setdefault(self.home[key_of(item)], []).append(item)
        return by

    def request(self, layer: int, misses, hits=(), released=(), used=()) -> LayerResponse:
        """As Scheduler.request, across nodes; deliveries of experts homed elsewhere carry their node."""
        with self._lock:
            rel = self._by_home(released, tuple)
            use = self._by_home(used, lambda u: (u[0], u[1]))
            by = self._split(layer, misses)
            out = LayerResponse(layer, [])
            hits_by = self._split(layer, hits)
            for name in self.alive:
                if name not in by and name not in rel and name not in hits_by and name not in use:
                    continue
                sched = self.nodes[name]
                resp = sched.request(
                    layer, by.get(name, []), hits_by.get(name, []), rel.get(name, []), use.get(name, [])
                )
                for d in resp.deliveries:
                    if name != self.executor_node:
                        d.node, d.keep = name, False
                    out.deliveries.append(d)
                if name == self.executor_node:
                    out.drop_full += resp.drop_full
                out.deferred += resp.deferred
            return out

    def prefetch(self, layer: int, picks, released=(), used=()) -> LayerResponse:
        """As Scheduler.prefetch for the experts homed on the executor's node (the others are computed
        where they live, on request); releases and uses go to every node."""
        with self._lock:
            rel = self._by_home(released, tuple)
            use = self._by_home(used, lambda u: (u[0], u[1]))
            me = self.executor_node
            for name in self.alive:
                if name != me and (name in rel or name in use):
                    self.nodes[name].release(rel.get(name, []), use.get(name, []))
            mine = [(e, t) for e, t in picks if self.home[(layer, e)] == me]
            return self.nodes[me].prefetch(layer, mine, rel.get(me, []), use.get(me, []))

    def release(self, released=(), used=()) -> None:
        with self._lock:
            rel = self._by_home(released, tuple)
            use = self._by_home(used, lambda u: (u[0], u[1]))
            for name in self.alive:
                if name in rel or name in use:
                    self.nodes[name].release(rel.get(name, []), use.get(name, []))

    def steps(self, reports) -> None:
        """As Scheduler.steps: each report applied as :meth:`step`, in order."""
        for r in reports:
            self.step(*r)

    def step(self, hits=(), released=(), used=(), timing=None) -> None:
        """As Scheduler.step; ``timing`` is not used: the split is re-planned online on one node only."""
        with self._lock:
            hits_by = self._by_home(hits, lambda h: (h[0], h[1]))
            rel = self._by_home(released, tuple)
            use = self._by_home(used, lambda u: (u[0], u[1]))
            for name in self.alive:
                self.nodes[name].step(hits_by.get(name, []), rel.get(name, []), use.get(name, []))

    def node_failed(self, name: str) -> list[str]:
        """Take ``name`` out: its experts get homes on the nodes left. Returns the nodes still alive."""
        with self._lock:
            if name not in self.alive or name == self.executor_node:
                return list(self.alive)
            self.alive.remove(name)
            self.failed.append(name)
            abandon = getattr(self.nodes[name].runner, "abandon", None)
            if abandon is not None:
                abandon()
            moved = [k for k, h in self.home.items() if h == name]
            for i, key in enumerate(moved):
                self.home[key] = self.alive[i % len(self.alive)]
            log.warning("node %s failed: %d experts re-homed on %s", name, len(moved), ", ".join(self.alive))
            return list(self.alive)

    def failed_nodes(self) -> list[str]:
        with self._lock:
            return list(self.failed)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            per = {name: s.stats() for name, s in self.nodes.items()}
            ex = per[self.executor_node]
            total: dict[str, Any] = {k: ex[k] for k in ("costs", "plan")}
            hits = {f: sum(p["hits"][f] for p in per.values()) for f in ex["hits"]}
            misses = sum(p["misses"] for p in per.values())
            acc = sum(hits.values()) + misses
            cache = {
                "budget": sum(p["cache"]["budget"] for p in per.values()),
                "peak": sum(p["cache"]["peak"] for p in per.values()),
                "experts": {
                    f: sum(p["cache"]["experts"][f] for p in per.values()) for f in ex["cache"]["experts"]
                },
            }
            total.update(
                hits=hits,
                misses=misses,
                accesses=acc,
                hit_rate={f: (v / acc if acc else 0.0) for f, v in hits.items()},
                miss_rate=misses / acc if acc else 0.0,
                cache=cache,
                requests=sum(p["requests"] for p in per.values()),
                waves=sum(p["waves"] for p in per.values()),
                steps=ex["steps"],
                background_tasks=sum(p["background_tasks"] for p in per.values()),
                planned_makespan_s=sum(p["planned_makespan_s"] for p in per.values()),
                nodes={
                    name: {"hits": p["hits"], "misses": p["misses"], "cache": p["cache"]}
                    for name, p in per.items()
                },
                alive=list(self.alive),
                failed=list(self.failed),
                homes={name: sum(1 for h in self.home.values() if h == name) for name in self.nodes},
            )
            return total

    def reset_stats(self) -> None:
        with self._lock:
            for s in self.nodes.values():
                s.reset_stats()

    def ping(self) -> bool:
        return True
