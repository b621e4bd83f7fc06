"""The nodes of a Ray cluster and the stages started on each (used by the cluster and Ray backends).

Each node gets its own stages, pinned to it with ``NodeAffinitySchedulingStrategy``: an IOLoader reading
that node's copy of the store, one Decompressor per core, and (on every node but the executor's) an
ExpertHost that computes the experts held there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

__all__ = [
    "ClusterStages",
    "NodeInfo",
    "NodeStages",
    "discover_nodes",
    "node_entry",
    "pin",
    "start_node",
]

log = logging.getLogger(__name__)

# resources every Ray node reports; any other name is a custom resource the operator declared
_BUILTIN = {"CPU", "GPU", "memory", "object_store_memory"}


@dataclass(frozen=True)
class NodeInfo:
    name: str  # the node's custom resource (edge0, orin-a, ...) when it declares one, else its address
    node_id: str
    address: str
    cpus: int
    gpus: int
    driver: bool  # the node this program runs on: it hosts the executor


@dataclass
class NodeStages:
    info: NodeInfo
    loader: Any
    decompressors: list[Any]
    host: Any = None  # ExpertHost (not on the executor's node)

    def actors(self) -> list[Any]:
        return [self.loader, *self.decompressors, *([self.host] if self.host is not None else [])]


@dataclass
class ClusterStages:
    nodes: dict[str, NodeStages] = field(default_factory=dict)

    @property
    def executor_node(self) -> NodeStages:
        return next(n for n in self.nodes.values() if n.info.driver)

    def actors(self) -> list[Any]:
        return [a for n in self.nodes.values() for a in n.actors()]


def _custom(resources: dict[str, float]) -> list[str]:
    return sorted(
        k
        for k in resources
        if k not in _BUILTIN and not k.startswith("node:") and not k.startswith("accelerator_type")
    )


def discover_nodes(select: list[str] | None = None) -> list[NodeInfo]:
    """The alive nodes of the cluster this process is attached to, the driver's first. ``select``: names
    (custom resource or address) to keep; the driver's node is always kept."""
    import ray

    me = ray.get_runtime_context().get_node_id()
    out: list[NodeInfo] = []
    seen: set[str] = set()
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        res = n.get("Resources", {})
        custom = _custom(res)
        name = custom[0] if custom else n["NodeManagerAddress"]
        if name in seen:
            name = f"{name}-{n['NodeID'][:6]}"
        seen.add(name)
        out.append(
            NodeInfo(
                name=name,
                node_id=n["NodeID"],
                address=n["NodeManagerAddress"],
                cpus=max(1, int(res.get("CPU", 1))),
                gpus=int(res.get("GPU", 0)),
                driver=n["NodeID"] == me,
            )
        )
    if not any(n.driver for n in out):
        raise ConfigError("this program's own Ray node is not among the cluster's alive nodes")
    if select:
        known = {n.name for n in out} | {n.address for n in out}
        unknown = [s for s in select if s not in known]
        if unknown:
            raise ConfigError(
                f"nodes {unknown} are not in the cluster; alive nodes: {', '.join(sorted(n.name for n in out))}"
            )
        out = [n for n in out if n.driver or n.name in select or n.address in select]
    return sorted(out, key=lambda n: (not n.driver, n.name))


def pin(info: NodeInfo) -> dict[str, Any]:
    """Ray options placing an actor on ``info``'s node (and nowhere else)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=info.node_id, soft=False)}


def start_node(
    info: NodeInfo,
    store_path: str,
    read_options,
    workers: int | None,
    torch_threads: int | None,
    device: str | None = None,
) -> NodeStages:
    """Start one node's loader, decompressors (``workers``, default one per CPU the node declares) and, away
    from the driver, its ExpertHost."""
    from .ray_stages import SEE_GPUS, actor_classes, start_decompressors, start_loader

    opts = pin(info)
    loader = start_loader(store_path, read_options, **opts)
    decs = start_decompressors(store_path, workers or info.cpus, **opts)
    host = None
    if not info.driver:
        host = (
            actor_classes()["ExpertHost"]
            .options(runtime_env=SEE_GPUS, **opts)
            .remote(store_path, info.name, device, torch_threads)
        )
    return NodeStages(info, loader, decs, host)


def node_entry(
    address: str,
    loader: dict | None,
    decompressors: list[dict],
    host: dict | None,
    sched: dict | None,
    homed: int | None = None,
) -> dict[str, Any]:
    """One node's line in ``stats()["nodes"]``: tasks it ran (reads, decodes, expert computations), its
    cache's hits per form and misses, bytes it read, its budget and peak."""
    reads = loader["reads"] if loader else 0
    decodes = sum(d["tasks"] for d in decompressors)
    computes = host["computes"] if host else 0
    return {
        "alive": True,
        "address": address,
        "tasks": reads + decodes + computes,
        "reads": reads,
        "decodes": decodes,
        "computes": computes,
        "hits": dict(sched["hits"]) if sched else {},
        "misses": sched["misses"] if sched else 0,
        "bytes_read": loader["bytes_read"] if loader else 0,
        "budget": sched["cache"]["budget"] if sched else 0,
        "peak_cache_bytes": sched["cache"]["peak"] if sched else 0,
        "experts_homed": homed,
        "workers": len(decompressors),
    }
