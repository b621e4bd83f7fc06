"""The cluster backend: one model served across the nodes of a Ray cluster (several edge devices).

Every node gets an IOLoader reading its copy of the store and one Decompressor per core; every node but
the executor's also gets an ExpertHost that computes the experts held there. One ClusterScheduler and the
Executor run on the node of the program that attached (the driver); the budget is split equally over the
nodes. See stages/cluster_scheduler.py for how work is placed and how a failed node is survived.

Stores: every node reads the store at the same path and must hold a full copy of it (checked at start-up
by the store's identity); a node whose copy is missing or different is named in the error.
"""

from __future__ import annotations

import logging

from ..errors import ConfigError, ZipMoEError
from ..runtime.budget import inflight_per_node
from .base import LaneStats
from .cluster_nodes import ClusterStages, NodeInfo, node_entry, pin, start_node
from .ray_backend import RayBackend, wait
from .ray_stages import actor_classes, start_executor
from .ray_transport import RayRunner, RayTransport

__all__ = ["ClusterBackend"]

log = logging.getLogger(__name__)


class ClusterBackend(RayBackend):
    """Stages on every node of ``infos`` (the driver's first), the budget split equally between them."""

    name = "cluster"

    def __init__(self, store_dir: str, store, config, *, started_ray: bool, infos: list[NodeInfo]):
        super().__init__(store_dir, store, config, started_ray=started_ray, node=infos[0])
        self.infos = infos
        self.nodes = len(infos)
        self.cluster = ClusterStages()

    def start_lanes(self) -> None:
        cfg = self.config
        for info in self.infos:
            ns = start_node(
                info, self.store_dir, cfg.read_options(), cfg.num_decompressors, cfg.torch_threads, cfg.device
            )
            self.cluster.nodes[info.name] = ns
            self._owned.extend(ns.actors())
        ids = {}
        for name, ns in self.cluster.nodes.items():  # every node must read a copy of this very store
            try:
                ids[name] = wait(ns.loader.store_id.remote())
            except ZipMoEError as e:
                raise type(e)(f"node {name} ({ns.info.address}) cannot serve this store: {e}") from None
        mine = self.store.index.store_id.hex()
        other = sorted(n for n, i in ids.items() if i != mine)
        if other:
            raise ConfigError(
                f"nodes {other} read a different store at {self.store_dir}; every node needs a copy of the same "
                "store at the same path (copy the store directory to each device)"
            )
        wait([a.ping.remote() for a in self.cluster.actors()])
        ex = self.cluster.executor_node
        self.loader, self.decompressors = ex.loader, ex.decompressors
        log.info(
            "serving across %d nodes: %s",
            len(self.infos),
            ", ".join(f"{i.name} ({i.address})" for i in self.infos),
        )

    def start_pipeline(self, sched_config, costs) -> None:
        from ..stages.cluster_scheduler import NodeSetup

        cfg = self.config
        share = sched_config.budget // self.nodes
        inflight = inflight_per_node(self.store.top_k, self.nodes)
        setups = [
            NodeSetup(
                name,
                share,
                RayRunner(ns.loader, ns.decompressors),
                executor=ns.info.driver,
                inflight=inflight,
            )
            for name, ns in self.cluster.nodes.items()
        ]
        here = pin(self.cluster.executor_node.info)
        self.scheduler = (
            actor_classes()["ClusterScheduler"].options(**here).remote(self.store_dir, sched_config, setups)
        )
        self.hosts = {name: ns.host for name, ns in self.cluster.nodes.items() if ns.host is not None}
        transport = RayTransport(self.scheduler, self.hosts, cfg.node_timeout)
        self.executor = start_executor(
            self.store_dir,
            self.scheduler,
            device=cfg.device,
            dtype=cfg.dtype,
            torch_threads=cfg.torch_threads,
            timeline=cfg.timeline,
            prefetch=cfg.prefetch,
            transport=transport,
            **here,
        )
        self._owned.extend([self.scheduler, self.executor])
        wait([self.scheduler.ping.remote(), self.executor.ping.remote()])
        device = self.call("executor", "stats")["device"]
        for (
            name,
            host,
        ) in self.hosts.items():  # remote experts must run the executor's kernels to stay bit-exact
            got = wait(host.stats.remote())["device"]
            if got.split(":")[0] != str(device).split(":")[0]:
                raise ConfigError(
                    f"node {name} computes experts on {got} but the executor runs on {device}: outputs would "
                    "not be bit-identical; give every node the same kind of device (--device), or leave that "
                    "node out (--nodes)"
                )
        self._started_pipeline(costs)

    def _stages(self) -> list:
        gone = set(self.call("scheduler", "failed_nodes"))
        alive = [a for name, ns in self.cluster.nodes.items() if name not in gone for a in ns.actors()]
        return [self.scheduler, self.executor, *alive]

    def read_timelines(self) -> list[tuple[str, dict]]:
        """Every node that answers within twice the node timeout; the others are left out."""
        import ray

        gone = set(self.call("scheduler", "failed_nodes"))
        out = []
        for name, ns in self.cluster.nodes.items():
            if name in gone:
                continue
            try:
                out.append(
                    (name, ray.get(ns.loader.read_timeline.remote(), timeout=2 * self.config.node_timeout))
                )
            except ray.exceptions.RayError as e:  # died since, or not answering: its reads are not there
                log.warning("node %s gave no read timeline: %s", name, e)
        return out

    def lane_stats(self, sched: dict) -> LaneStats:
        """Per node; a node that died since the last layer is reported down, never waited on for ever."""
        import ray

        out = LaneStats()
        timeout = 2 * self.config.node_timeout
        for name, ns in self.cluster.nodes.items():
            down = {"alive": False, "address": ns.info.address, "tasks": None}
            if name not in sched["alive"]:
                out.nodes[name] = down
                continue
            try:
                got = ray.get([a.stats.remote() for a in ns.actors()], timeout=timeout)
            except ray.exceptions.GetTimeoutError:
                out.nodes[name] = {**down, "note": f"not answering within {timeout:g} s"}
                continue
            except ray.exceptions.RayError as e:  # died since, or a bug in stats(): say which
                out.nodes[name] = {**down, "note": f"stats failed: {type(e).__name__}: {e}"}
                continue
            n = len(ns.decompressors)
            out.loaders.append(got[0])
            out.decompressors.extend(got[1 : 1 + n])
            host = got[1 + n] if ns.host is not None else None
            out.nodes[name] = node_entry(
                ns.info.address, got[0], got[1 : 1 + n], host, sched["nodes"][name], sched["homes"][name]
            )
        if not out.loaders:
            raise ZipMoEError(
                "no node of the cluster answers for its stats; check the nodes (README, Edge clusters)"
            )
        return out
