"""Starting the pipeline's stages as Ray actors (the public actor API re-exports these: zipmoe_ray.actors).

Placement: every zipmoe actor asks for ``num_cpus=0`` (their parallelism is set by ``num_decompressors``,
not by Ray's CPU accounting, so they fit nodes started with few CPUs) and for an optional custom resource
(``resources={"edge0": 0.01}``) that pins it to a node. Loader and decompressors restart automatically
(``max_restarts``) and Ray re-runs their pending tasks (``max_task_retries``): the tasks are pure functions
of their inputs, so a killed decompressor costs time, never correctness.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from .ray_transport import COMPUTE, RayRunner, RayTransport, kill

__all__ = [
    "SEE_GPUS",
    "Stages",
    "actor_classes",
    "kill_and_wait",
    "object_store_usage",
    "seeing_gpus",
    "start_decompressors",
    "start_executor",
    "start_loader",
    "start_scheduler",
]

log = logging.getLogger(__name__)

_classes: dict[str, Any] = {}


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


# How long an idle OpenMP worker of the executor spins before it sleeps (GNU OpenMP's GOMP_SPINCOUNT, in
# spin iterations). With the executor's torch work on one thread (stages/compute_thread.py) libgomp's own
# default applies, 300,000: its workers then spin long after every kernel, also while the executor waits
# for experts, taking the cores the decode lanes need (zstd store at 25%, 2 GB/s: 7.7-7.9 executor
# CPU-seconds per run against 6.4-6.8 with this and 5.4-5.6 before; TPOT moved within noise). README,
# "the all-hit Ray overhead".
EXECUTOR_SPINCOUNT = "30000"


_WAIT_POLICY = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def executor_env(runtime_env: dict | None) -> dict:
    """The executor actor's runtime_env: ``runtime_env`` (the caller's) seeing the GPUs, with the OpenMP
    spin count above unless the caller's runtime_env, or this process's environment, sets a wait policy.
    A wait policy of this process's environment is passed on explicitly: Ray's workers inherit the
    environment of the node's raylet, which is this process's only for a Ray instance it started itself
    (not with ``--address``)."""
    env = seeing_gpus(runtime_env)
    mine = env["env_vars"]
    if not any(k in mine for k in _WAIT_POLICY):
        ours = {k: os.environ[k] for k in _WAIT_POLICY if k in os.environ}
        env["env_vars"] = {**mine, **(ours or {"GOMP_SPINCOUNT": EXECUTOR_SPINCOUNT})}
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
    timeline: bool = False,
    prefetch: bool = True,
    resources: dict[str, float] | None = None,
    transport: RayTransport | None = None,
    **ray_options,
):
    """Start an Executor actor (the model on ``device``) whose MoE layers fetch experts via ``scheduler``
    (or through ``transport``, which in a cluster also reaches the other nodes' ExpertHosts)."""
    cls = actor_classes()["Executor"]
    ray_options["runtime_env"] = executor_env(ray_options.get("runtime_env"))
    return cls.options(**_opts(resources, **ray_options)).remote(
        store_path,
        transport or RayTransport(scheduler),
        device,
        dtype,
        torch_threads,
        timeline,
        prefetch,
        True,  # own_thread: the actor's calls arrive on a pool of threads (stages/compute_thread.py)
    )


def kill_and_wait(actors: list, timeout: float = 10.0) -> list:
    """Kill ``actors`` and wait until Ray reports each one dead; returns those still alive at ``timeout``.

    ``ray.kill`` only asks the GCS to kill: a call made right after it can still be served, and the actor's
    memory is not yet free. Waiting here is what lets ``close()`` promise that the stages are gone."""
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


def object_store_usage(address: str | None = None) -> dict[str, int]:
    """Plasma bytes and objects in use across the cluster at ``address`` (default: the one this process is
    connected to; never autodetected) from Ray's memory summary (coarse: MiB).

    Needs grpcio (installed with ``ray[default]`` or the ``dev`` extra)."""
    import re

    import ray

    try:
        from ray._private.internal_api import memory_summary
    except ImportError as e:
        raise ImportError(f"object_store_usage needs grpcio: pip install grpcio ({e})") from None

    address = address or ray.get_runtime_context().gcs_address
    text = memory_summary(address=address, stats_only=True)
    m = re.search(r"Plasma memory usage (\d+) MiB, (\d+) objects", text)
    if not m:
        return {"bytes": -1, "objects": -1}
    return {"bytes": int(m.group(1)) << 20, "objects": int(m.group(2))}
