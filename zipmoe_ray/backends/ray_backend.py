"""The Ray backend: each stage is a Ray actor around its plain class; planes travel through the object store.

Placement: every zipmoe actor asks for ``num_cpus=0`` (their parallelism is set by ``num_decompressors``,
not by Ray's CPU accounting, so they fit nodes started with few CPUs) and for an optional custom resource
(``resources={"edge0": 0.01}``) that pins it to a node. Loader and decompressors restart automatically
(``max_restarts``) and Ray re-runs their pending tasks (``max_task_retries``): the tasks are pure functions
of their inputs, so a killed decompressor costs time, never correctness.

Hot path per MoE layer: one ``Scheduler.request`` call (~1 ms) that submits one task per missing expert to
the loader and decompressor actors and returns their ObjectRefs; the executor ``ray.wait``s on them and
reads each result zero-copy. The scheduler never fetches a payload.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from ..errors import ZipMoEError

__all__ = [
    "RayRunner",
    "RayTransport",
    "Stages",
    "actor_classes",
    "kill",
    "kill_and_wait",
    "object_store_usage",
    "start_decompressors",
    "start_executor",
    "start_loader",
    "start_scheduler",
    "unwrap",
]

log = logging.getLogger(__name__)

_classes: dict[str, Any] = {}
COMPUTE = "compute"  # ExpertHost's concurrency group for expert computation


def actor_classes() -> dict[str, Any]:
    """The Ray actor classes wrapping IOLoader, Decompressor, Scheduler and Executor (created once)."""
    if not _classes:
        import ray

        from ..stages.decompressor import Decompressor
        from ..stages.executor import Executor
        from ..stages.loader import IOLoader
        from ..stages.scheduler import Scheduler

        restart = {"max_restarts": -1, "max_task_retries": -1}
        # two threads: the next read starts while the last result is copied into the object store
        _classes["IOLoader"] = ray.remote(num_cpus=0, max_concurrency=2, **restart)(IOLoader)
        _classes["Decompressor"] = ray.remote(num_cpus=0, **restart)(Decompressor)
        _classes["Scheduler"] = ray.remote(num_cpus=0)(Scheduler)
        _classes["Executor"] = ray.remote(num_cpus=0, max_concurrency=4)(Executor)
        from ..stages.cluster_scheduler import ClusterScheduler
        from ..stages.expert_host import ExpertHost

        # experts are computed one at a time (each uses every core: two at once would only thrash), on their
        # own thread, so that liveness pings and stats (the default group) are answered meanwhile
        _classes["ExpertHost"] = ray.remote(num_cpus=0, concurrency_groups={COMPUTE: 1}, **restart)(
            ExpertHost
        )
        _classes["ClusterScheduler"] = ray.remote(num_cpus=0)(ClusterScheduler)
    return _classes


def unwrap(e: BaseException) -> BaseException:
    """The zipmoe error inside a Ray task error, so callers see ChecksumError, not RayTaskError."""
    cause = getattr(e, "cause", None)
    while cause is not None and not isinstance(cause, ZipMoEError):
        cause = getattr(cause, "cause", None)
    return cause if isinstance(cause, ZipMoEError) else e


class RayRunner:
    """TaskRunner over actors (built inside the scheduler actor from the handles it is given)."""

    def __init__(self, loader, decompressors: list):
        self.loader = loader
        self.decompressors = list(decompressors)
        self.workers = len(self.decompressors)

    def abandon(self) -> None:
        """The node these actors run on failed: end them, so that their pending tasks fail instead of
        waiting for a node that will not come back."""
        kill([self.loader, *self.decompressors])

    def read(self, key, part):
        return self.loader.read.remote(key[0], key[1], part)

    def read_split(self, key):
        return tuple(self.loader.read_split.options(num_returns=2).remote(key[0], key[1]))

    def decode(self, lane, key, exp, sm, planes_only=False, part=None):
        return self.decompressors[lane].decode.remote(key[0], key[1], None, exp, sm, planes_only, part)

    def derive(self, lane, key, words, part):
        return self.decompressors[lane].derive.remote(key[0], key[1], words, part)


class RayTransport:
    """The executor's view of a scheduler actor, of ObjectRef results and, in a cluster, of the other
    nodes' ExpertHosts."""

    def __init__(self, scheduler, hosts: dict | None = None, node_timeout: float | None = None):
        """``node_timeout``: seconds to wait on another node's ``hosts`` (given with them, in a cluster)."""
        if hosts and node_timeout is None:
            raise ValueError("other nodes' hosts need a node_timeout (EngineConfig.node_timeout)")
        self.scheduler = scheduler
        self.hosts = dict(hosts or {})
        self.node_timeout = node_timeout

    def request(self, layer, misses, hits, released):
        import ray

        try:
            return ray.get(self.scheduler.request.remote(layer, misses, hits, released))
        except ray.exceptions.RayTaskError as e:
            raise unwrap(e) from None

    def step(self, hits, released) -> None:
        self.scheduler.step.remote(hits, released)  # fire and forget: ordered before the next request

    def wait_any(self, handles: list, timeout: float | None = None) -> list:
        import ray

        ready, _ = ray.wait(handles, num_returns=1, timeout=timeout)
        return ready

    def compute(self, node: str, layer: int, expert: int, kind: str, x, w, value):
        return (
            self.hosts[node]
            .compute.options(concurrency_group=COMPUTE)
            .remote(layer, expert, kind, x, w, value)
        )

    def unresponsive(self, nodes, timeout: float) -> set[str]:
        """Of ``nodes``, those whose ExpertHost does not answer a ping within ``timeout`` seconds."""
        import ray

        pings = {self.hosts[n].ping.remote(): n for n in nodes}
        ready, _ = ray.wait(list(pings), num_returns=len(pings), timeout=timeout)
        alive = set()
        for r in ready:
            try:
                ray.get(r)
                alive.add(pings[r])
            except Exception:  # a ping that errors is a node that does not answer
                pass
        return set(nodes) - alive

    def node_failed(self, node: str) -> None:
        import ray

        ray.get(self.scheduler.node_failed.remote(node))
        host = self.hosts.pop(node, None)
        if host is not None:
            kill([host])

    @staticmethod
    def is_node_failure(e: BaseException) -> bool:
        """Errors that mean a node's work is lost (its process, node or objects died), not a bug or bad data."""
        import ray

        lost = (
            ray.exceptions.RayActorError,
            ray.exceptions.ObjectLostError,
            ray.exceptions.OwnerDiedError,
            ray.exceptions.NodeDiedError,
            ray.exceptions.WorkerCrashedError,
        )
        return isinstance(e, lost) or isinstance(getattr(e, "cause", None), lost)

    def get(self, handle):
        import ray

        try:
            return ray.get(handle)
        except ray.exceptions.RayTaskError as e:
            raise unwrap(e) from None


@dataclass
class Stages:
    """Handles of a running pipeline: what ``ZipMoEEngine(stages=...)`` wires together."""

    loader: Any
    decompressors: list[Any]
    scheduler: Any
    executor: Any
    owned: list[Any] = field(default_factory=list)  # actors the engine started and must kill on close

    def all(self) -> list[Any]:
        return [self.loader, *self.decompressors, self.scheduler, self.executor]


# Ray hides every GPU from an actor that asks for none (CUDA_VISIBLE_DEVICES=""): an executor left that way
# would silently run on the CPU of a Jetson. The stages that compute (Executor, ExpertHost) see the node's
# GPUs instead; they ask for num_cpus=0 like every zipmoe actor, so they fit nodes started without --num-gpus.
SEE_GPUS = {"env_vars": {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}}


def seeing_gpus(runtime_env: dict | None) -> dict:
    """``runtime_env`` (the caller's, if any) with :data:`SEE_GPUS` merged into its ``env_vars``."""
    env = dict(runtime_env or {})
    env["env_vars"] = {**(env.get("env_vars") or {}), **SEE_GPUS["env_vars"]}
    return env


def _opts(resources: dict[str, float] | None, name: str | None = None, **extra) -> dict:
    o = dict(extra)
    if resources:
        o["resources"] = resources
    if name:
        o["name"] = name
    return o


def start_loader(
    store_path: str, read_options=None, *, resources: dict[str, float] | None = None, **ray_options
):
    """Start an IOLoader actor (one per storage device) reading ``store_path`` on the node it lands on."""
    return (
        actor_classes()["IOLoader"]
        .options(**_opts(resources, **ray_options))
        .remote(store_path, read_options)
    )


def start_decompressors(
    store_path: str, n: int, *, resources: dict[str, float] | None = None, **ray_options
) -> list:
    """Start ``n`` Decompressor actors (one per core they should use)."""
    cls = actor_classes()["Decompressor"]
    return [cls.options(**_opts(resources, **ray_options)).remote(store_path, i) for i in range(n)]


def start_scheduler(store_path: str, config, loader, decompressors: list, costs=None, **ray_options):
    """Start the central Scheduler actor driving ``loader`` and ``decompressors``."""
    return (
        actor_classes()["Scheduler"]
        .options(**ray_options)
        .remote(store_path, config, RayRunner(loader, decompressors), costs)
    )


def start_executor(
    store_path: str,
    scheduler,
    *,
    device: str | None = None,
    dtype: str = "auto",
    torch_threads: int | None = None,
    resources: dict[str, float] | None = None,
    transport: RayTransport | None = None,
    **ray_options,
):
    """Start an Executor actor (the model on ``device``) whose MoE layers fetch experts via ``scheduler``
    (or through ``transport``, which in a cluster also reaches the other nodes' ExpertHosts)."""
    cls = actor_classes()["Executor"]
    ray_options["runtime_env"] = seeing_gpus(ray_options.get("runtime_env"))
    return cls.options(**_opts(resources, **ray_options)).remote(
        store_path, transport or RayTransport(scheduler), device, dtype, torch_threads
    )


def kill(actors: list) -> None:
    """Ask Ray to end ``actors`` for good (no restart); one already gone is skipped."""
    import ray

    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception as e:  # already dead, or its handle was never registered
            log.debug("kill %s: %s", actor, e)


def kill_and_wait(actors: list, timeout: float = 10.0) -> list:
    """Kill ``actors`` and wait until Ray reports each one dead; returns those still alive at ``timeout``.

    ``ray.kill`` only asks the GCS to kill: a call made right after it can still be served, and the actor's
    memory is not yet free. Waiting here is what lets ``close()`` promise that the stages are gone."""
    import time

    import ray

    kill(actors)
    deadline = time.monotonic() + timeout
    alive = list(actors)
    while alive and time.monotonic() < deadline:
        still = []
        for actor in alive:
            try:
                # no retry: a restartable actor's probe would otherwise be retried (and logged) forever
                probe = actor.__ray_ready__.options(max_task_retries=0).remote()
                ray.get(probe, timeout=max(0.1, deadline - time.monotonic()))
            except ray.exceptions.GetTimeoutError:
                still.append(actor)  # busy or not yet killed
            except Exception:  # RayActorError and kin: dead
                continue
            else:
                still.append(actor)
        alive = still
        if alive:
            time.sleep(0.05)
    if alive:
        log.warning("%d actor(s) still alive %.0f s after ray.kill", len(alive), timeout)
    return alive


def object_store_usage() -> dict[str, int]:
    """Plasma bytes and objects in use across the cluster (from Ray's memory summary; coarse: MiB).

    Needs grpcio (installed with ``ray[default]`` or the ``dev`` extra)."""
    import re

    try:
        from ray._private.internal_api import memory_summary
    except ImportError as e:
        raise ImportError(f"object_store_usage needs grpcio: pip install grpcio ({e})") from None

    text = memory_summary(stats_only=True)
    m = re.search(r"Plasma memory usage (\d+) MiB, (\d+) objects", text)
    if not m:
        return {"bytes": -1, "objects": -1}
    return {"bytes": int(m.group(1)) << 20, "objects": int(m.group(2))}
